"""System shared-memory regions (Triton's ``systemsharedmemory`` extension). Torch-free.

A client creates a POSIX shared-memory object (``/dev/shm/<key>``), registers a window of
it under a name, and then names the region instead of sending tensor bytes: the server
copies inputs out of it and answers into it.

Safety (the client owns the object and may truncate or unlink it at any time):

* keys are plain names (``/name`` or ``name``: letters, digits, ``. _ -``) under
  ``/dev/shm``, opened without following links or blocking, and must be regular files
  owned by the server's own user (``fstat`` of the descriptor opened: another user's
  object, even one the server could open as root, is refused); the names of the server's
  own engine arenas (``--engine process``) are refused;
* regions are scoped to their owner: with API keys on, the key that registered a region
  (``scoped``); another key neither sees it (status), uses it (inference), nor removes it
  (unregister, one or all); a region name is unique within its owner, and each owner may
  hold ``MAX_REGIONS`` regions;
* the server never maps the object: it copies with ``pread``/``pwrite`` on the file
  descriptor it keeps open from registration, so a truncated object cannot fault (a read
  past the end comes back short), and every use first checks the window against the
  object's current size (``fstat``) and that the key still names the registered object
  (``stat``): a truncated or unlinked region is a 400 naming it;
* the one race left is benign: if the client truncates the object between that check and
  an output ``pwrite``, the write grows the object back to the written end (no fault, no
  crash; the client's own truncation is undone for those bytes);
* regions are closed on unregister and on shutdown (``close``); ``enabled=False`` refuses
  every call (``ACTSERVE_SHARED_MEMORY=false``).

Every method runs on the event loop: no locks.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass

from service.engine.ipc.arena import is_arena
from service.errors import InvalidRequest, UnknownActivation, echo

ROOT = "/dev/shm"
MAX_REGIONS = 256  # per owner (per API key when keys are on)
_KEY_RE = re.compile(r"/?[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")  # fullmatch: no "\n" before $
_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
OFF = ("system shared memory is turned off on this server (ACTSERVE_SHARED_MEMORY=false); "
       "send the tensor in the request")


class RegionNotFound(UnknownActivation):
    """An unknown region name (404, like an unknown model)."""

    type = "not_found"


def owner_of(token: bytes | str | None) -> str | None:
    """The owner a bearer token stands for (a digest: the key itself is not kept); None
    when the server runs without keys."""
    if token is None:
        return None
    raw = token.encode("latin-1") if isinstance(token, str) else token
    return hashlib.sha256(raw.strip()).hexdigest()[:24]


@dataclass(slots=True)
class Region:
    name: str
    key: str
    offset: int  # of the window in the object
    byte_size: int  # of the window
    fd: int
    dev: int
    ino: int
    path: str
    owner: str | None = None

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset,
                "byte_size": self.byte_size}


class SystemRegions:
    """Every region of the server, by (owner, name). Used directly (owner None: no API
    keys, or a caller that does not scope) or through ``scoped(owner)``."""

    def __init__(self, enabled: bool = True, root: str = ROOT) -> None:
        self.enabled = enabled
        self.root = root
        self._regions: dict[tuple[str | None, str], Region] = {}

    def scoped(self, owner: str | None) -> SystemRegions | ScopedRegions:
        """The regions as ``owner`` sees them (itself when ``owner`` is None)."""
        return self if owner is None else ScopedRegions(self, owner)

    # -- management -------------------------------------------------------------------------
    def register(self, name: object, key: object, offset: object, byte_size: object,
                 owner: str | None = None) -> None:
        self.check_enabled()
        name = check_name(name)
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise InvalidRequest(
                f"shared memory key {echo(key)} is not allowed: use a plain name under /dev/shm "
                "('/name' or 'name': letters, digits, '.', '_', '-')"
            )
        if is_arena(key.lstrip("/")):
            raise InvalidRequest(f"shared memory key {key!r} is reserved: the server's engine "
                                 "arenas cannot be registered")
        offset = check_int(offset, "offset", 0)
        byte_size = check_int(byte_size, "byte_size", 1)
        if (owner, name) in self._regions:
            raise InvalidRequest(f"shared memory region {name!r} is already registered; "
                                 "unregister it first")
        if sum(1 for o, _ in self._regions if o == owner) >= MAX_REGIONS:
            raise InvalidRequest(f"at most {MAX_REGIONS} shared memory regions may be registered")
        path = os.path.join(self.root, key.lstrip("/"))
        fd = _open(path, key)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRequest(f"shared memory key {key!r} is not a shared memory object")
            if st.st_uid != os.geteuid():
                raise InvalidRequest(
                    f"shared memory key {key!r} is owned by uid {st.st_uid}, not by the "
                    f"server's user (uid {os.geteuid()}): only objects the server's own user "
                    "owns can be registered")
            if offset + byte_size > st.st_size:
                raise InvalidRequest(
                    f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is "
                    f"beyond the end of {key!r} ({st.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[(owner, name)] = Region(name, key, offset, byte_size, fd, st.st_dev,
                                              st.st_ino, path, owner)

    def unregister(self, name: object = "", owner: str | None = None) -> None:
        """One region, or every region of ``owner`` when ``name`` is empty."""
        self.check_enabled()
        if not name:
            for region in [r for r in self._regions.values() if r.owner == owner]:
                del self._regions[(owner, region.name)]
                os.close(region.fd)
            return
        region = self._get(check_name(name), owner)
        del self._regions[(owner, region.name)]
        os.close(region.fd)

    def status(self, name: object = "", owner: str | None = None) -> list[dict]:
        """The regions of ``owner`` (all of them, or the one named)."""
        self.check_enabled()
        if not name:
            return [r.status() for r in self._regions.values() if r.owner == owner]
        return [self._get(check_name(name), owner).status()]

    def close(self) -> None:
        """Release every region (unregister-all and shutdown)."""
        regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            os.close(region.fd)

    def __len__(self) -> int:
        return len(self._regions)

    # -- use --------------------------------------------------------------------------------
    def check(self, name: object, offset: object, size: int, where: str,
              owner: str | None = None) -> Region:
        """The region of ``owner`` named for an input or output, with ``size`` bytes from
        ``offset`` inside its window (a 400 naming ``where`` otherwise)."""
        self.check_enabled()
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}: shared_memory_region must be a region name")
        region = self._regions.get((owner, name))
        if region is None:
            raise InvalidRequest(f"{where}: shared memory region {echo(name)} is not registered")
        offset = check_int(offset, f"{where}: shared_memory_offset", 0)
        if offset + size > region.byte_size:
            raise InvalidRequest(
                f"{where}: {size} bytes at offset {offset} do not fit in shared memory region "
                f"{name!r} of {region.byte_size} bytes"
            )
        return region

    def read_into(self, region: Region, offset: int, out: memoryview, where: str) -> None:
        """Copy ``len(out)`` bytes from the region's window at ``offset`` into ``out``."""
        start = region.offset + offset
        self._live(region, start + out.nbytes, where)
        done = 0
        while done < out.nbytes:
            n = os.preadv(region.fd, [out[done:]], start + done)
            if n <= 0:  # truncated after the check: a short read, never a fault
                raise InvalidRequest(self._shrunk(region, where))
            done += n

    def write(self, region: Region, offset: int, data: memoryview, where: str) -> None:
        start = region.offset + offset
        self._live(region, start + data.nbytes, where)
        done = 0
        while done < data.nbytes:
            done += os.pwrite(region.fd, data[done:], start + done)

    def _live(self, region: Region, end: int, where: str) -> None:
        if self._regions.get((region.owner, region.name)) is not region:
            raise InvalidRequest(f"{where}: shared memory region {region.name!r} was "
                                 "unregistered while the request was in flight")
        try:
            st = os.stat(region.path, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == (region.dev, region.ino)
        except OSError:
            same = False
        if not same:
            raise InvalidRequest(
                f"{where}: the shared memory object {region.key!r} of region {region.name!r} "
                "was removed (unlinked) after registration; register it again"
            )
        if os.fstat(region.fd).st_size < end:
            raise InvalidRequest(self._shrunk(region, where))

    @staticmethod
    def _shrunk(region: Region, where: str) -> str:
        size = os.fstat(region.fd).st_size
        return (f"{where}: the shared memory object {region.key!r} of region {region.name!r} "
                f"was truncated to {size} bytes after registration; its window ends at "
                f"{region.offset + region.byte_size}")

    # -- helpers ----------------------------------------------------------------------------
    def check_enabled(self) -> None:
        """A 400 when the extension is turned off."""
        if not self.enabled:
            raise InvalidRequest(OFF)

    def _get(self, name: str, owner: str | None = None) -> Region:
        region = self._regions.get((owner, name))
        if region is None:
            raise RegionNotFound(f"no shared memory region named {name!r} is registered")
        return region


class ScopedRegions:
    """``SystemRegions`` as one owner sees them: the same calls, on that owner's regions."""

    __slots__ = ("_all", "owner")

    def __init__(self, regions: SystemRegions, owner: str) -> None:
        self._all = regions
        self.owner = owner

    @property
    def enabled(self) -> bool:
        return self._all.enabled

    def check_enabled(self) -> None:
        self._all.check_enabled()

    def register(self, name: object, key: object, offset: object, byte_size: object) -> None:
        self._all.register(name, key, offset, byte_size, self.owner)

    def unregister(self, name: object = "") -> None:
        self._all.unregister(name, self.owner)

    def status(self, name: object = "") -> list[dict]:
        return self._all.status(name, self.owner)

    def check(self, name: object, offset: object, size: int, where: str) -> Region:
        return self._all.check(name, offset, size, where, self.owner)

    def read_into(self, region: Region, offset: int, out: memoryview, where: str) -> None:
        self._all.read_into(region, offset, out, where)

    def write(self, region: Region, offset: int, data: memoryview, where: str) -> None:
        self._all.write(region, offset, data, where)

    def __len__(self) -> int:
        return len(self.status())


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"shared memory region name {echo(name)} is not allowed: 1 to 128 letters, digits, "
            "'.', '_', ':' or '-'"
        )
    return name


def check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{what} must be an integer >= {minimum}, got {echo(value)}")
    return value


def _open(path: str, key: str) -> int:
    # O_NONBLOCK: a FIFO or device planted under the key must not block the event loop in
    # open(); it is refused below as not a regular file
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(path, os.O_RDWR | flags)
    except FileNotFoundError:
        raise InvalidRequest(f"shared memory key {key!r} does not exist under /dev/shm") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot open shared memory key {key!r}: {exc.strerror}") from None
