"""Derive deploy/schemas/leaderworkerset-v1.json from LeaderWorkerSet's published CRD.

No cluster runs in CI, so tests/tools/test_deploy.py validates deploy/k8s/multi-node/ against this schema:
the CRD's own ``openAPIV3Schema`` with

- the embedded Kubernetes types (the leader/worker pod templates, the volume claim templates and
  the top-level metadata) replaced by ``$ref`` s to the Kubernetes definitions that
  kubernetes-validate bundles, so they are checked as strictly as a Deployment's pod template;
- every other object closed (``additionalProperties: false`` unless the CRD preserves unknown
  fields), as the API server's strict field validation (``kubectl apply``'s default) rejects
  unknown fields;
- descriptions and ``x-kubernetes-*`` annotations dropped (CEL rules are not checked here).

Run it again when the pinned LWS release changes:

    python deploy/schemas/derive_lws_schema.py leaderworkerset.x-k8s.io_leaderworkersets.yaml v0.10.0

with the CRD file from that release (``config/crd/bases/`` in kubernetes-sigs/lws).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("leaderworkerset-v1.json")
# Base URI of kubernetes-validate's `_definitions.json` (its `$id`).
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json#/$defs/"
# Schema paths (properties joined by ".", "[]" for array items) -> embedded Kubernetes type.
EMBEDDED = {
    "metadata": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "spec.leaderWorkerTemplate.leaderTemplate": "io.k8s.api.core.v1.PodTemplateSpec",
    "spec.leaderWorkerTemplate.workerTemplate": "io.k8s.api.core.v1.PodTemplateSpec",
    "spec.leaderWorkerTemplate.volumeClaimTemplates[]": "io.k8s.api.core.v1.PersistentVolumeClaim",
}


def convert(node: dict[str, Any], path: str = "") -> dict[str, Any]:
    """One structural-schema node as strict JSON Schema (see the module docstring)."""
    if path in EMBEDDED:
        return {"$ref": K8S_DEFINITIONS + EMBEDDED[path]}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: convert(sub, f"{path}.{name}".lstrip(".")) for name, sub in value.items()}
        elif key == "items":
            out[key] = convert(value, path + "[]")
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = convert(value, path + "{}")
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [convert(sub, path) for sub in value]
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def derive(crd: dict[str, Any], release: str) -> dict[str, Any]:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = convert(served["schema"]["openAPIV3Schema"])
    group = crd["spec"]["group"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://{group}/leaderworkerset-v1.json",
        "$comment": (
            f"Derived by deploy/schemas/derive_lws_schema.py from LeaderWorkerSet {release}'s CRD "
            f"({crd['metadata']['name']}); do not edit by hand."
        ),
        "x-lws-release": release,
        **schema,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="leaderworkerset.x-k8s.io_leaderworkersets.yaml of the release")
    parser.add_argument("release", help="the LWS release the CRD comes from, e.g. v0.10.0")
    args = parser.parse_args()
    schema = derive(yaml.safe_load(args.crd.read_text()), args.release)
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
