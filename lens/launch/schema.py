"""Strict validation of a custom resource against its CRD's openAPIV3Schema.

An API server prunes fields a structural schema does not list, so a misspelled field in a PyTorchJob (`elasticPolcy`,
`restartPolicy` one level too deep) is dropped without an error and the job runs wrongly. `strict_schema` turns the
CRD schema into a JSON Schema that rejects such fields: `additionalProperties: false` on every object that lists
`properties` (unless it already says what extras may be, or preserves unknown fields), `x-kubernetes-int-or-string`
as integer-or-string, and `nullable` as also-null.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml


def strict_schema(open_api_v3: dict) -> dict:
    """A draft-07 JSON Schema from a CRD version's `openAPIV3Schema`; the input is not modified."""
    schema = _strict(copy.deepcopy(open_api_v3))
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return schema


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            node[key] = {name: _strict(sub) for name, sub in value.items()}
        elif isinstance(value, (dict, list)) and key != "enum":
            node[key] = _strict(value)
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.pop("nullable", False) and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


def crd_version_schema(crd: dict, version: str = "v1") -> dict:
    """The `openAPIV3Schema` of one served version of a CRD (a dict as read from YAML or the API server)."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    names = [v["name"] for v in crd["spec"]["versions"]]
    raise KeyError(f"CRD {crd['metadata']['name']} has no version {version} (has {names})")


def strict_schema_from_file(path: str | Path, version: str = "v1") -> dict:
    """Strict schema of a CRD stored as YAML (e.g. the operator's kubeflow.org_pytorchjobs.yaml)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB of YAML: libyaml is 10x faster
    docs = [d for d in yaml.load_all(Path(path).read_text(), Loader=loader) if d]
    crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
    return strict_schema(crd_version_schema(crd, version))


def validate(obj: dict, schema: dict) -> list[str]:
    """Every violation of `schema` by `obj`, one line each as `path: message` (empty when valid)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


def sdk_round_trip_losses(job: dict) -> list[str]:
    """Fields of a PyTorchJob manifest that the kubeflow-training SDK models do not carry back (misspelled or
    misplaced fields, which an API server would prune). Quantities may come back as strings."""
    from kubeflow.training import ApiClient

    client = ApiClient()
    # `deserialize` is the public entry: it reads a REST response's JSON body, which is what a manifest is.
    response = SimpleNamespace(data=json.dumps(job))
    back = client.sanitize_for_serialization(client.deserialize(response, "KubeflowOrgV1PyTorchJob"))
    return _differences(job, back, "")


def _differences(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: lost" for k in a if k not in b]
        for k in a:
            if k in b:
                out += _differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if a == b or (isinstance(a, int) and not isinstance(a, bool) and str(a) == b):
        return []
    return [f"{path}: {a!r} came back as {b!r}"]


def check_manifests(docs: list[dict], pytorchjob_schema: dict | None = None, kube_version: str = "1.31") -> list[str]:
    """Every problem in rendered manifests, one line each: core kinds (and the PyTorchJob's pod template) against
    the strict Kubernetes schemas of `kube_version`; the PyTorchJob against `pytorchjob_schema` (see
    `strict_schema`) when given, and always through the kubeflow-training SDK models."""
    import kubernetes_validate

    problems = []

    def core(doc: dict, what: str) -> None:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.absolute_path)) or "(root)"
            problems.append(f"{what}: {where}: {e.message}")

    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion") == "kubeflow.org/v1" and doc.get("kind") == "PyTorchJob":
            if pytorchjob_schema is not None:
                problems += [f"{what}: {p}" for p in validate(doc, pytorchjob_schema)]
            problems += [f"{what}: {p} (kubeflow-training SDK)" for p in sdk_round_trip_losses(doc)]
            for role, spec in doc.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{role.lower()}"},
                            "template": spec.get("template", {})}
                core(template, f"{what} {role} template")
        else:
            try:
                core(doc, what)
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{what}: no schema for {doc.get('apiVersion')} in Kubernetes {kube_version}")
    return problems
