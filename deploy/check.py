#!/usr/bin/env python3
"""Static checks of deploy/, run by the e2e test `deploy` (scripts/test.sh sets it up).

1. `kubectl kustomize` renders every overlay (with a throwaway secrets.env).
2. Every rendered object validates against the Kubernetes schemas (kubernetes-validate,
   strict: unknown fields are errors) for the oldest and newest versions we support.
3. Policy: no container may run as root or escalate, every container has CPU and memory
   requests and limits, root filesystems are read-only, GPU workers request a GPU.
4. The coordinator's and the worker's arguments, in the manifests and in the Dockerfiles'
   CMD, are flags the binaries accept (`<bin> <subcommand> --help`): the deployment stays in
   step with the code.
5. hadolint passes on every Dockerfile, which also must end as a non-root USER, copy no
   model weights and bake in no secrets.

    check.py --coordinator BIN --worker BIN [--self-test]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
OVERLAYS = sorted(p.parent for p in (DEPLOY / "k8s" / "overlays").glob("*/kustomization.yaml"))
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*[!e]"))
# Grpc probes and elastic Indexed Jobs need 1.27; check the span clusters run today.
K8S_VERSIONS = ["1.29.0", "1.33.0"]
POD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}


def render(overlay: Path) -> list[dict]:
    """The overlay's objects, rendered from a copy of deploy/k8s with a dummy secrets.env."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(DEPLOY / "k8s", copy)
        target = copy / overlay.relative_to(DEPLOY / "k8s")
        # Every overlay's secrets.env: an overlay may build on another (gpu-tls on gpu).
        for example in copy.glob("overlays/*/secrets.env.example"):
            lines = [l for l in example.read_text().splitlines() if l and not l.startswith("#")]
            secrets = "".join(f"{l.split('=')[0]}=dummy\n" for l in lines)
            (example.parent / "secrets.env").write_text(secrets)
        out = subprocess.run(
            ["kubectl", "kustomize", str(target)], capture_output=True, text=True, check=False
        )
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay.name} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_spec(obj: dict) -> dict | None:
    return obj["spec"]["template"]["spec"] if obj.get("kind") in POD_KINDS else None


def policy(obj: dict) -> list[str]:
    """What `obj` breaks of the policy (empty when nothing)."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    problems = []
    pod_sc = spec.get("securityContext", {})
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        where = f"{name} container {c['name']}"
        sc = c.get("securityContext", {})
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if non_root is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if user == 0:
            problems.append(f"{where}: runs as user 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(kind, {}):
                    problems.append(f"{where}: no {res} {kind[:-1]}")
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if "--device" in c.get("args", []) and "cuda" in c["args"] and not gpus:
            problems.append(f"{where}: a CUDA worker without an nvidia.com/gpu limit")
    return problems


def flags_of(binary: str, sub: str) -> set[str]:
    help_text = subprocess.run(
        [binary, sub, "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", help_text))


def check_args(args: list[str], binary: str, where: str, known: dict) -> list[str]:
    if not args:
        return []
    sub = args[0]
    if (binary, sub) not in known:
        try:
            known[(binary, sub)] = flags_of(binary, sub)
        except subprocess.CalledProcessError:
            return [f"{where}: `{Path(binary).name} {sub}` is not a subcommand"]
    accepted = known[(binary, sub)]
    return [
        f"{where}: `{Path(binary).name} {sub}` has no flag {a}"
        for a in args[1:]
        if a.startswith("--") and a.split("=")[0] not in accepted
    ]


def binary_for(image: str, bins: dict) -> str | None:
    for name, path in bins.items():
        if re.search(rf"/{name}(-cuda)?(:|$)", image) or image.startswith(f"{name}:"):
            return path
    return None


def dockerfile_problems(path: Path, bins: dict, known: dict, hadolint: str) -> list[str]:
    text = path.read_text()
    problems = []
    lint = subprocess.run([hadolint, str(path)], capture_output=True, text=True, check=False)
    if lint.returncode != 0:
        problems.append(f"{path.name}: hadolint:\n{lint.stdout}{lint.stderr}")
    final = text[text.rfind("\nFROM ") :]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{path.name}: the runtime stage does not end as a non-root USER")
    if re.search(r"\.(gguf|safetensors|bin)\b", "\n".join(re.findall(r"^(?:COPY|ADD).*", text, re.M))):
        problems.append(f"{path.name}: copies model weights into the image")
    if re.search(r"^(ENV|ARG)\s+\S*(TOKEN|SECRET|PASSWORD|ACCESS_KEY)", text, re.M | re.I):
        problems.append(f"{path.name}: bakes a secret into the image")
    entry = re.findall(r"^ENTRYPOINT\s+(\[.*\])", text, re.M)
    cmd = re.findall(r"^CMD\s+(\[.*\])", text, re.M)
    if not entry or not cmd:
        problems.append(f"{path.name}: needs an exec-form ENTRYPOINT and CMD")
        return problems
    name = Path(json.loads(entry[-1])[0]).name
    binary = bins.get(name)
    if binary is None:
        problems.append(f"{path.name}: ENTRYPOINT runs {name}, which is not ours")
    else:
        problems += check_args(json.loads(cmd[-1]), binary, f"{path.name} CMD", known)
    return problems


def self_test() -> None:
    """The policy check must catch what it exists to catch."""
    bad = {
        "kind": "Deployment",
        "metadata": {"name": "bad"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "args": ["--device", "cuda"]}]}}},
    }
    found = "\n".join(policy(bad))
    for expected in ("runAsNonRoot", "no cpu limit", "no memory request", "writable", "nvidia.com/gpu"):
        assert expected in found, f"the policy check misses {expected!r}: {found}"
    bad["spec"]["template"]["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 0}
    assert "user 0" in "\n".join(policy(bad))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--hadolint", default="hadolint")
    opts = parser.parse_args()
    self_test()
    bins = {"coordinator": opts.coordinator, "worker": opts.worker}
    known: dict = {}
    problems: list[str] = []
    if len(OVERLAYS) < 2 or len(DOCKERFILES) < 3:
        problems.append(f"expected the cpu and gpu overlays and three Dockerfiles: {OVERLAYS} {DOCKERFILES}")
    objects = 0
    for overlay in OVERLAYS:
        for obj in render(overlay):
            objects += 1
            where = f"{overlay.name}: {obj['kind']}/{obj['metadata']['name']}"
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    problems.append(f"{where} (Kubernetes {version}): {e.message} at {list(e.path)}")
            problems += [f"{overlay.name}: {p}" for p in policy(obj)]
            spec = pod_spec(obj)
            for c in (spec or {}).get("containers", []):
                binary = binary_for(c["image"], bins)
                if binary:
                    problems += check_args(c.get("args", []), binary, f"{where} {c['name']}", known)
    for path in DOCKERFILES:
        problems += dockerfile_problems(path, bins, known, opts.hadolint)
    for p in problems:
        print(f"deploy check: {p}", file=sys.stderr)
    print(
        f"deploy check: {len(OVERLAYS)} overlays, {objects} objects, {len(DOCKERFILES)} Dockerfiles, "
        f"{len(problems)} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
