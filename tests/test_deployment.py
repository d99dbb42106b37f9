"""The container deployment: Dockerfile, docker-compose.yml and its CUDA override.

No image is built or pulled here: the files are read as Docker and Compose read them, every
environment variable given to a pacsbridge container goes through :class:`config.Settings`
(a misspelt variable is otherwise ignored without a word: the settings ignore unknown names),
the services are checked to point at each other, the health-check commands are run against
real endpoints on 127.0.0.1, and ``docker compose config`` (or Compose v1's
``docker-compose config``) validates the files when it is installed (CI installs it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import pytest
import yaml
from sqlalchemy.engine import make_url

from config import Settings
from security.policy import exposure_error, http_auth_enforced, is_loopback
from tests.conftest import IN_CI, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CUDA_FILE = ROOT / "docker-compose.cuda.yml"
DOCKERFILE = ROOT / "Dockerfile"

#: What an operator puts in .env (README, "Deployment"); distinct values, so that a service
#: wired to the wrong secret is caught.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-4f9c1d",
    "MINIO_ROOT_PASSWORD": "minio-root-8a2e77",
    "S3_SECRET_KEY": "s3-secret-51b0c3",
    "ORTHANC_PASSWORD": "orthanc-0d3f2a",
}


# --- Compose's variable interpolation ------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """A ``${VAR:?error}`` whose variable is unset (Compose refuses the file)."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}`` and ``$$`` replaced as Compose does (Compose
    specification, "Interpolation"), in every string of a loaded YAML tree."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        given = env.get(name)
        unset = given is None or (op is not None and op.startswith(":") and given == "")
        if op in (":-", "-"):
            return arg if unset else str(given)
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return str(given)
        return given or ""

    return _VARIABLE.sub(replace, value)


def load_compose(*files: Path, env: Mapping[str, str] = SECRETS) -> dict[str, Any]:
    """The merged services of ``files`` (later files override earlier ones, mappings merged by
    key as Compose merges them), interpolated with ``env``."""
    merged: dict[str, Any] = {}
    for path in files:
        merged = _merge(merged, yaml.safe_load(path.read_text()))
    return interpolate(merged, env)


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        result = dict(base)
        for key, item in override.items():
            result[key] = _merge(base[key], item) if key in base else item
        return result
    return override


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


# --- reading the Dockerfile ----------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuation lines
    joined and comments dropped as Docker's parser does."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, args.strip()))
        logical = ""
    return stages[1:]  # stages[0]: the global ARGs before the first FROM


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def image_env() -> dict[str, str]:
    """The pacsbridge settings the runtime image's ENV gives."""
    env: dict[str, str] = {}
    for keyword, args in final_stage():
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                if name.startswith("PACSBRIDGE_"):
                    env[name] = value
    return env


def instruction(keyword: str) -> str:
    found = [args for kw, args in final_stage() if kw == keyword]
    assert found, f"the runtime stage of the Dockerfile has no {keyword}"
    return found[-1]


# --- settings as a container sees them -----------------------------------------------------------


@pytest.fixture
def container_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """``settings(env)``: the Settings of a process that sees exactly ``env`` (no other
    ``PACSBRIDGE_*`` variable, no .env file, no TOML file)."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(name)

    def settings(env: Mapping[str, str]) -> Settings:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            return Settings(_env_file=None)  # type: ignore[call-arg]

    yield settings


def pacsbridge_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run this repository's image (built from its Dockerfile)."""
    found = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        if context == ".":
            found[name] = service
    return found


def _command(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_runs_serve_and_a_separate_worker_from_this_image() -> None:
    compose = load_compose(COMPOSE_FILE)
    services = pacsbridge_services(compose)
    commands = {name: _command(service) for name, service in services.items()}
    assert sorted(commands.values()) == [["serve"], ["worker"]], commands
    images = {service["image"] for service in services.values()}
    assert len(images) == 1, f"serve and worker run different images: {images}"
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, CUDA_FILE)], ids=["cpu", "cuda"])
def test_every_variable_given_to_pacsbridge_is_a_setting(
    files: tuple[Path, ...], container_settings: Any
) -> None:
    compose = load_compose(*files)
    known = set(Settings.model_fields)
    for name, service in pacsbridge_services(compose).items():
        env = env_of(service)
        assert env, f"{name} is given no settings"
        for variable in env:
            assert variable.startswith("PACSBRIDGE_"), (
                f"{name}: {variable} is not a pacsbridge setting (PACSBRIDGE_*)"
            )
            field = variable.removeprefix("PACSBRIDGE_").lower()
            assert field in known, f"{name}: {variable} names no setting of config.Settings"
        settings = container_settings({**image_env(), **env})
        # each value arrives as given (a JSON value parsed, not ignored)
        assert settings.auth == "required"
        assert settings.worker_in_serve is False
        assert settings.log_format == "json"
        assert settings.peers["orthanc"].check_host is True
        assert settings.s3_secure is False
        assert settings.public_url is None and not settings.dicom_timezone


def test_serve_and_worker_share_the_index_the_bucket_and_the_peers(container_settings: Any) -> None:
    compose = load_compose(COMPOSE_FILE)
    services = pacsbridge_services(compose)
    by_command = {
        _command(service)[0]: container_settings({**image_env(), **env_of(service)})
        for service in services.values()
    }
    serve, worker = by_command["serve"], by_command["worker"]
    shared = (
        "resolved_database_url",
        "resolved_storage_url",
        "s3_endpoint",
        "s3_access_key",
        "s3_secret_key",
        "s3_secure",
        "s3_region",
        "peers",
        "ae_title",
        "auth",
        "dicom_timezone",
        "ai",
        "routes",
        "destinations",
    )
    for name in shared:
        assert getattr(serve, name) == getattr(worker, name), name
    assert serve.resolved_database_url.startswith("postgresql")
    assert serve.resolved_storage_url.startswith("s3://")


def test_serve_is_exposed_only_with_authentication(container_settings: Any) -> None:
    compose = load_compose(COMPOSE_FILE)
    serve = next(s for s in pacsbridge_services(compose).values() if _command(s) == ["serve"])
    settings = container_settings({**image_env(), **env_of(serve)})
    assert not is_loopback(settings.http_host), "HTTP must be reachable from outside"
    assert http_auth_enforced(settings)
    assert exposure_error(settings) is None
    # the image alone (no PACSBRIDGE_AUTH) refuses to serve unauthenticated on the network
    bare = container_settings(image_env())
    problem = exposure_error(bare)
    assert problem is not None and "PACSBRIDGE_AUTH=required" in problem
    # its ports are published, on the ports it listens on
    published = {int(str(p).rsplit(":", 1)[-1]) for p in serve["ports"]}
    assert {settings.dimse_port, settings.http_port} <= published


def test_the_index_is_the_postgres_service(container_settings: Any) -> None:
    compose = load_compose(COMPOSE_FILE)
    services = compose["services"]
    postgres = env_of(services["postgres"])
    for service in pacsbridge_services(compose).values():
        url = make_url(container_settings({**image_env(), **env_of(service)}).database_url)
        assert url.host == "postgres" and url.port == 5432
        assert url.username == postgres["POSTGRES_USER"]
        assert url.password == postgres["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
        assert url.database == postgres["POSTGRES_DB"]
        depends = service["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
    test = services["postgres"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    assert test[test.index("-U") + 1] == postgres["POSTGRES_USER"]
    assert test[test.index("-d") + 1] == postgres["POSTGRES_DB"]


def test_the_bucket_is_created_on_start_for_pacsbridge(container_settings: Any) -> None:
    compose = load_compose(COMPOSE_FILE)
    services = compose["services"]
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert init.get("restart") == "no"
    init_env = env_of(init)
    minio_env = env_of(services["minio"])
    assert init_env["MINIO_ROOT_PASSWORD"] == minio_env["MINIO_ROOT_PASSWORD"]
    script = init["entrypoint"][-1]
    # the script reads its values from the container's environment ($$ in the file)
    assert 'mc mb --ignore-existing "local/$S3_BUCKET"' in script
    assert 'mc admin user add local "$S3_ACCESS_KEY" "$S3_SECRET_KEY"' in script
    assert "policy attach local pacsbridge-bucket" in script
    for service in pacsbridge_services(compose).values():
        settings = container_settings({**image_env(), **env_of(service)})
        storage = urlparse(settings.resolved_storage_url)
        assert storage.netloc == init_env["S3_BUCKET"]
        assert settings.s3_endpoint == "minio:9000"
        assert settings.s3_access_key == init_env["S3_ACCESS_KEY"]
        assert settings.s3_secret_key == init_env["S3_SECRET_KEY"] == SECRETS["S3_SECRET_KEY"]
        # pacsbridge does not hold MinIO's root credentials
        assert settings.s3_access_key != minio_env["MINIO_ROOT_USER"]


def test_orthanc_and_pacsbridge_are_declared_peers_of_each_other(container_settings: Any) -> None:
    compose = load_compose(COMPOSE_FILE)
    services = compose["services"]
    serve_name, serve = next(
        (n, s) for n, s in pacsbridge_services(compose).items() if _command(s) == ["serve"]
    )
    settings = container_settings({**image_env(), **env_of(serve)})
    orthanc_env = env_of(services["orthanc"])
    peer = settings.peers["orthanc"]
    assert peer.host == "orthanc" and "orthanc" in services
    assert peer.ae_title == orthanc_env["ORTHANC__DICOM_AET"]
    assert peer.port == int(orthanc_env.get("ORTHANC__DICOM_PORT", "4242"))
    modalities = json.loads(orthanc_env["ORTHANC__DICOM_MODALITIES"])
    assert [settings.ae_title, serve_name, settings.dimse_port] in modalities.values()
    users = json.loads(orthanc_env["ORTHANC__REGISTERED_USERS"])
    assert SECRETS["ORTHANC_PASSWORD"] in users.values()


def test_health_checks_and_named_volumes() -> None:
    compose = load_compose(COMPOSE_FILE)
    declared = set(compose["volumes"])
    data_dir = image_env()["PACSBRIDGE_DATA_DIR"]
    wanted_mounts = {
        "postgres": "/var/lib/postgresql/data",
        "minio": "/data",
        "orthanc": "/var/lib/orthanc/db",
        **{name: data_dir for name in pacsbridge_services(compose)},
    }
    for name, service in compose["services"].items():
        if name != "minio-init":  # a one-shot job
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source in declared, f"{name} mounts {source}, which is no named volume"
        if name in wanted_mounts:
            targets = {m.split(":")[1] for m in service.get("volumes", [])}
            assert wanted_mounts[name] in targets, f"{name} keeps {wanted_mounts[name]} nowhere"
    used = {m.split(":", 1)[0] for s in compose["services"].values() for m in s.get("volumes", [])}
    assert used == declared


def test_no_secret_has_a_default() -> None:
    text = COMPOSE_FILE.read_text()
    secrets = {
        m["braced"]
        for m in _VARIABLE.finditer(text)
        if m["braced"] and re.search("PASSWORD|SECRET", m["braced"])
    }
    assert secrets == set(SECRETS)
    for name in SECRETS:
        with pytest.raises(MissingVariable, match=name):
            load_compose(COMPOSE_FILE, env={k: v for k, v in SECRETS.items() if k != name})
        with pytest.raises(MissingVariable, match=name):
            load_compose(COMPOSE_FILE, env={**SECRETS, name: ""})


def test_cuda_override_gives_the_worker_a_cuda_build_and_the_gpus() -> None:
    compose = load_compose(COMPOSE_FILE, CUDA_FILE)
    worker = next(s for s in pacsbridge_services(compose).values() if _command(s) == ["worker"])
    index = worker["build"]["args"]["TORCH_INDEX_URL"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index)
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["image"] != "pacsbridge:latest", "the CUDA image needs its own tag"
    serve = next(s for s in pacsbridge_services(compose).values() if _command(s) == ["serve"])
    assert "args" not in serve["build"], "serve runs no AI and keeps the CPU image"


# --- the Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_runtime_runs_unprivileged() -> None:
    user = instruction("USER").split(":")[0]
    assert user not in ("", "root", "0"), f"the image runs as {user!r}"
    # the user exists: created in the runtime stage with that uid
    created = " ".join(args for kw, args in final_stage() if kw == "RUN")
    assert re.search(rf"useradd\b[^&]*--uid {re.escape(user)}\b", created)
    # and owns the data dir
    assert re.search(r"install -d -o pacsbridge -g pacsbridge -m 0700 /var/lib/pacsbridge", created)


def test_dockerfile_is_multi_stage_and_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert any("build-essential" in args for kw, args in build if kw == "RUN")
    assert not any("build-essential" in args for kw, args in runtime if kw == "RUN")
    assert any(kw == "COPY" and args.startswith("--from=build ") for kw, args in runtime)
    globals_ = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in globals_


def test_dockerfile_installs_the_cpu_torch_that_install_sh_pins() -> None:
    build = dockerfile_stages()[0]
    args = dict(a.split("=", 1) for kw, a in build if kw == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    pinned = re.search(r'"torch==([0-9.]+)"', (ROOT / "install.sh").read_text())
    assert pinned is not None
    assert args["TORCH_VERSION"] == pinned[1]
    runs = " ".join(a for kw, a in build if kw == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert "pip install -c /opt/pacsbridge/constraints.txt ." in runs
    # the brain-mr weights are checked to be in the image (nothing downloads at run time)
    assert "deepbet_weights" in runs


def test_dockerfile_ports_volume_entrypoint() -> None:
    env = image_env()
    assert set(instruction("EXPOSE").split()) == {
        env["PACSBRIDGE_DIMSE_PORT"],
        env["PACSBRIDGE_HTTP_PORT"],
    }
    assert json.loads(instruction("VOLUME")) == [env["PACSBRIDGE_DATA_DIR"]]
    assert json.loads(instruction("ENTRYPOINT")) == ["pacsbridge"]
    assert json.loads(instruction("CMD")) == ["serve"]
    assert "/health" in instruction("HEALTHCHECK")


# --- the health-check commands, run --------------------------------------------------------------


class _Probe(BaseHTTPRequestHandler):
    status: ClassVar[int] = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        body = b'{"status": "ok"}'
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[tuple[int, type[_Probe]]]:
    handler = type("Probe", (_Probe,), {"status": 200, "paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _exec_form(test: list[str]) -> list[str]:
    """A CMD health check as it would run here: ``python`` is this interpreter."""
    assert test[0] == "CMD"
    argv = list(test[1:])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without its pacsbridge settings: a data dir that exists, as
    the image's does, and ``extra``."""
    (tmp_path / "data").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    return {**env, "PACSBRIDGE_DATA_DIR": str(tmp_path / "data"), **extra}


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("source", ["Dockerfile", "compose"])
def test_http_health_checks_follow_the_server(
    source: str, probe_server: tuple[int, type[_Probe]], tmp_path: Path
) -> None:
    port, handler = probe_server
    if source == "Dockerfile":
        argv = _exec_form(["CMD", *json.loads(instruction("HEALTHCHECK").split(" CMD ", 1)[1])])
        path = "/health"
    else:
        compose = load_compose(COMPOSE_FILE)
        serve = next(s for s in pacsbridge_services(compose).values() if _command(s) == ["serve"])
        argv = _exec_form(serve["healthcheck"]["test"])
        path = "/ready"
    env = _clean_env(tmp_path, PACSBRIDGE_HTTP_PORT=str(port))
    assert _run(argv, env, tmp_path).returncode == 0
    assert handler.paths == [path]
    handler.status = 503
    assert _run(argv, env, tmp_path).returncode != 0
    closed = _clean_env(tmp_path, PACSBRIDGE_HTTP_PORT=str(free_port()))
    assert _run(argv, closed, tmp_path).returncode != 0


def test_worker_health_check_follows_the_index(tmp_path: Path) -> None:
    compose = load_compose(COMPOSE_FILE)
    worker = next(s for s in pacsbridge_services(compose).values() if _command(s) == ["worker"])
    argv = _exec_form(worker["healthcheck"]["test"])
    ok = _run(argv, _clean_env(tmp_path), tmp_path)
    assert ok.returncode == 0, ok.stderr
    unreachable = f"postgresql+psycopg2://pacsbridge:x@127.0.0.1:{free_port()}/pacsbridge"
    down = _run(argv, _clean_env(tmp_path, PACSBRIDGE_DATABASE_URL=unreachable), tmp_path)
    assert down.returncode != 0
    assert "OperationalError" in down.stderr


# --- docker compose config -----------------------------------------------------------------------


def _compose_command() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=60
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    message = (
        "neither `docker compose` nor `docker-compose` is installed "
        "(apt-get install --no-install-recommends docker-compose)"
    )
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, CUDA_FILE)], ids=["cpu", "cuda"])
def test_docker_compose_config_accepts_the_files(files: tuple[Path, ...], tmp_path: Path) -> None:
    compose = _compose_command()
    # an empty env file: an operator's .env beside docker-compose.yml plays no part
    empty = tmp_path / "empty.env"
    empty.write_text("")
    args = ["--env-file", str(empty), *[a for f in files for a in ("-f", str(f))]]
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    done = subprocess.run(
        [*compose, *args, "config"],
        env={**env, **SECRETS},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert set(rendered["services"]) == set(load_compose(*files)["services"])
    serve_env = rendered["services"]["pacsbridge"]["environment"]
    assert SECRETS["S3_SECRET_KEY"] == serve_env["PACSBRIDGE_S3_SECRET_KEY"]
    # without its secrets Compose refuses the file, naming what is missing
    refused = subprocess.run(
        [*compose, *args, "config", "-q"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "PASSWORD" in refused.stderr or "SECRET" in refused.stderr
