"""The Train tab's paths go through the Dataset tab's folder guard (`app/guard.py` over `access.py`).

Listening mode is the WebUI started with --listen and without --enable-insecure-extension-access:
there every path field, the config file Load / Save path and the dataset plan are refused outside
the allowed folders with the Dataset tab's message, and nothing is queued, trained or written.
Local mode accepts the same paths. The run manager is the real one, over the real tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import assert_same_as, make_dataset, small_run_config, snapshot
from lora_train.access import AccessPolicy
from lora_train.app import guard, job
from lora_train.app.runs import RunManager, RunRequest
from lora_train.errors import UserError
from lora_train.host.standalone import StandaloneHost

REFUSED = "outside the allowed folders"


class TinyHost(StandaloneHost):
    def __init__(self, model, root: Path, access: AccessPolicy):
        super().__init__("builtin:tiny", root / "models" / "Lora", root / "lora_train" / "runs", access)
        self._loaded = model
        self.events: list = []

    def on_event(self, e):
        self.events.append(e)


@pytest.fixture
def webui(tmp_path):
    """A WebUI data folder (the allowed roots: it and its train/), and a photo folder outside it."""
    root = tmp_path / "webui"
    (root / "train").mkdir(parents=True)
    outside = tmp_path / "srv"
    make_dataset(outside / "photos", count=2)
    (outside / "cfg.toml").write_text('network_dim = 2\n', encoding="utf-8")
    (outside / "dataset.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(outside / "photos" / "1_zkz").as_posix()}"\n',
                                          encoding="utf-8")
    (outside / "prompts.txt").write_text("zkz\n", encoding="utf-8")
    (outside / "weights.safetensors").write_bytes(b"")
    (outside / "state").mkdir()
    return root, outside


def policy(root: Path, remote: bool) -> AccessPolicy:
    # the WebUI host's roots: its data folder and the train folder in it (host/a1111/host.py)
    return AccessPolicy.build([root, root / "train"], remote=remote)


def outside_value(key: str, outside: Path) -> str:
    return str({
        "train_data_dir": outside / "photos", "reg_data_dir": outside / "photos", "dataset_config": outside / "dataset.toml", "in_json": outside / "meta.json",
        "network_weights": outside / "weights.safetensors", "resume": outside / "state", "output_dir": outside / "out",
        "logging_dir": outside / "logs", "sample_prompts": outside / "prompts.txt", "vae": outside / "vae.safetensors",
        "base_weights": outside / "weights.safetensors", "metadata_thumbnail": outside / "thumb.png",
        "log_tracker_config": outside / "trackers.toml",
    }[key])


KEYS = list(guard.PATH_KEYS)


def test_every_path_key_of_the_config_is_guarded():
    from lora_train.train.config import TrainConfig

    # a path key added to the config tree must be added to the guard too
    path_like = {k for k, (_, _, hint) in TrainConfig.key_index().items() if hint is not bool
                 and (k.endswith(("_dir", "_config", "_weights", "_prompts")) or k in ("resume", "in_json", "vae", "metadata_thumbnail"))}
    assert path_like - {"pretrained_model_name_or_path"} == set(KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_listening_refuses_each_path_field_and_nothing_runs(webui, tiny_model, key):
    root, outside = webui
    host = TinyHost(tiny_model, root, policy(root, remote=True))
    manager = RunManager(host)
    inside = root / "train" / "mine"
    make_dataset(inside, count=2)
    config = small_run_config(inside, "guarded", epochs=1)
    config.set(key, outside_value(key, outside))
    before = snapshot(tiny_model)
    with pytest.raises(UserError) as e:
        manager.submit(RunRequest(config))
    message = str(e.value)
    assert message.startswith(f"{key}: ") and REFUSED in message and "--enable-insecure-extension-access" in message
    assert manager.latest() is None and manager.snapshot()["queue"] == []
    assert host.events == [], "nothing trained"
    assert not host.lora_dir().exists() and not host.work_dir().exists(), "nothing written"
    assert not (outside / "out").exists() and not (outside / "logs").exists()
    assert_same_as(tiny_model, before)


@pytest.mark.parametrize("key", KEYS)
def test_local_mode_accepts_each_path_field(webui, key):
    root, outside = webui
    config = small_run_config(root / "train" / "mine", "local", epochs=1)
    config.set(key, outside_value(key, outside))
    guard.guard_config(config, policy(root, remote=False))
    want = str(Path(outside_value(key, outside)).resolve())
    assert config.get(key) == ([want] if key == "base_weights" else want)


def test_listening_refuses_a_relative_path_that_climbs_out(webui, tiny_model):
    root, outside = webui
    host = TinyHost(tiny_model, root, policy(root, remote=True))
    climb = "train/" + os.path.relpath(outside / "photos", root / "train")  # train/../../srv/photos
    assert climb.startswith("train/..")
    with pytest.raises(UserError, match=REFUSED):
        RunManager(host).submit(RunRequest(small_run_config(Path(climb), "climb", epochs=1)))
    assert host.events == [] and not host.lora_dir().exists()


def test_listening_trains_inside_the_allowed_folders(webui, tiny_model):
    """The control: the guard refuses by place, not always; a relative path is read under the data folder."""
    root, _ = webui
    make_dataset(root / "train" / "mine", count=2)
    host = TinyHost(tiny_model, root, policy(root, remote=True))
    manager = RunManager(host)
    status = manager.submit(RunRequest(small_run_config(Path("train/mine"), "inside", epochs=1)))
    assert manager.wait(300)
    run = manager.run(status.id)
    assert run.phase == "finished", run.error
    assert (host.lora_dir() / "inside.safetensors").is_file()


def test_local_mode_trains_on_a_folder_anywhere(webui, tiny_model):
    root, outside = webui
    host = TinyHost(tiny_model, root, policy(root, remote=False))
    manager = RunManager(host)
    status = manager.submit(RunRequest(small_run_config(outside / "photos", "anywhere", epochs=1)))
    assert manager.wait(300)
    assert manager.run(status.id).phase == "finished"
    assert (host.lora_dir() / "anywhere.safetensors").is_file()


def test_a_dataset_toml_inside_may_not_point_outside(webui):
    root, outside = webui
    toml = root / "train" / "dataset.toml"
    toml.write_text((outside / "dataset.toml").read_text(encoding="utf-8"), encoding="utf-8")
    config = small_run_config(root / "train", "toml", epochs=1)
    config.set("train_data_dir", None)
    config.set("dataset_config", str(toml))
    with pytest.raises(UserError, match=f"dataset.toml: image_dir: .*{REFUSED}"):
        guard.guard_config(config, policy(root, remote=True))
    guard.guard_config(config, policy(root, remote=False))  # locally it is the user's own file


def test_config_file_load_and_save_are_guarded(webui):
    root, outside = webui
    listening, local = policy(root, remote=True), policy(root, remote=False)
    with pytest.raises(UserError, match=f"config file: .*{REFUSED}"):
        guard.load_config(listening, str(outside / "cfg.toml"))
    config = small_run_config(root / "train", "cfg", epochs=1)
    with pytest.raises(UserError, match=f"config file: .*{REFUSED}"):
        guard.save_config(listening, config, str(outside / "saved.toml"))
    assert not (outside / "saved.toml").exists(), "nothing written outside"
    with pytest.raises(UserError, match=REFUSED):
        guard.save_config(listening, config, "train/" + os.path.relpath(outside / "saved.toml", root / "train"))
    assert not (outside / "saved.toml").exists()
    # inside, or locally anywhere, both work
    written = guard.save_config(listening, config, "train/saved.toml")
    assert written == (root / "train" / "saved.toml").resolve() and written.is_file()
    assert guard.load_config(listening, "train/saved.toml").network.network_dim == config.network.network_dim
    assert guard.load_config(local, str(outside / "cfg.toml")).network.network_dim == 2
    assert guard.save_config(local, config, str(outside / "saved.toml")).is_file()


def test_the_plan_before_start_is_guarded(webui, tiny_model):
    """The plan lists the folder's images and problems: a remote page may not list /srv/photos."""
    root, outside = webui
    listening = TinyHost(tiny_model, root, policy(root, remote=True))
    with pytest.raises(UserError, match=f"train_data_dir: .*{REFUSED}"):
        job.plan_on_host(small_run_config(outside / "photos", "plan", epochs=1), listening)
    local = TinyHost(tiny_model, root, policy(root, remote=False))
    assert job.plan_on_host(small_run_config(outside / "photos", "plan", epochs=1), local).scan.items


def test_listening_saves_configs_only_as_toml_and_never_over_other_files(webui):
    """The WebUI's own folder is an allowed root: Save must not become a way to write webui-user.sh,
    an extension's code or any other file there (found by hand in the real WebUI with --listen)."""
    root, outside = webui
    listening, local = policy(root, remote=True), policy(root, remote=False)
    config = small_run_config(root / "train", "cfg", epochs=1)
    config.set("output_name", "$(touch /tmp/pwned)")
    (root / "webui-user.sh").write_text("#!/bin/bash\n", encoding="utf-8")
    (root / "pyproject.toml").write_text('[project]\nname = "webui"\n', encoding="utf-8")
    for name in ("webui-user.sh", "evil.sh", "train/x.py", "pyproject.toml"):
        before = (root / name).read_bytes() if (root / name).exists() else None
        with pytest.raises(UserError, match="config file: "):
            guard.save_config(listening, config, name)
        assert ((root / name).read_bytes() if (root / name).exists() else None) == before, name
    # locally too: a slip of the hand must not turn webui-user.sh into a TOML
    with pytest.raises(UserError, match="not a LoRA Train config"):
        guard.save_config(local, config, str(root / "pyproject.toml"))
    with pytest.raises(UserError, match="saved as a .toml file"):
        guard.save_config(local, config, str(root / "webui-user.sh"))
    assert (root / "webui-user.sh").read_text(encoding="utf-8") == "#!/bin/bash\n"
    # a new .toml, and a LoRA Train config over itself, are fine; locally anywhere
    assert guard.save_config(listening, config, "train/mine.toml").is_file()
    assert guard.save_config(listening, config, "train/mine.toml").is_file()
    assert guard.save_config(local, config, str(outside / "mine.toml")).is_file()


def test_a_missing_dataset_is_refused_at_start_not_queued(webui, tiny_model):
    root, _ = webui
    host = TinyHost(tiny_model, root, policy(root, remote=False))
    manager = RunManager(host)
    with pytest.raises(UserError, match=r"train_data_dir '.*nope' does not exist"):
        manager.submit(RunRequest(small_run_config(root / "nope", "nope", epochs=1)))
    assert manager.latest() is None and host.events == []


def test_listening_loads_only_toml_configs(webui):
    root, _ = webui
    (root / "webui-user.sh").write_text("# export COMMANDLINE_ARGS=\n", encoding="utf-8")
    with pytest.raises(UserError, match="a config is a .toml file"):
        guard.load_config(policy(root, remote=True), "webui-user.sh")
    assert guard.load_config(policy(root, remote=False), str(root / "webui-user.sh")).network.network_dim is None


def test_a_dataset_toml_metadata_file_may_not_point_outside(webui):
    root, outside = webui
    (root / "train" / "photos").mkdir(parents=True)
    toml = root / "train" / "dataset.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "photos"\nmetadata_file = "{(outside / "meta.json").as_posix()}"\n',
                    encoding="utf-8")
    config = small_run_config(root / "train", "toml", epochs=1)
    config.set("train_data_dir", None)
    config.set("dataset_config", str(toml))
    with pytest.raises(UserError, match=f"dataset.toml: metadata_file: .*{REFUSED}"):
        guard.guard_config(config, policy(root, remote=True))
