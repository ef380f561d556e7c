"""huggingface_repo_id & co.: what would be uploaded where, with huggingface_hub's HfApi and
snapshot_download replaced (no network here). Expected paths and flags are sd-scripts'
(library/huggingface_util.upload, train_util.resume_from_local_or_hf_if_specified):
`<huggingface_path_in_repo>/<file name>`, private unless visibility is "public", the state folder
as a folder upload with save_state_to_huggingface."""

import shutil
import threading

import huggingface_hub
import pytest
import torch
from conftest import make_dataset

from lora_train.app import job
from lora_train.errors import UserError
from lora_train.network.files import load_lora
from lora_train.train import events as ev
from lora_train.train.config import TrainConfig


class FakeApi:
    made: list["FakeApi"] = []
    fail: Exception | None = None

    def __init__(self, token=None):
        self.token = token
        self.calls: list[tuple] = []
        FakeApi.made.append(self)

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        if FakeApi.fail:
            raise FakeApi.fail
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, repo_type=None):
        with open(path_or_fileobj, "rb") as f:  # what the hub would get, read when it is sent
            data = f.read()
        self.calls.append(("upload_file", repo_id, repo_type, path_in_repo, data, threading.current_thread().name))

    def upload_folder(self, *, folder_path, path_in_repo, repo_id, repo_type=None):
        files = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, repo_type, path_in_repo, files, threading.current_thread().name))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.made, FakeApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def config_for(tmp_path, **extra):
    data = make_dataset(tmp_path / "data", count=2)
    return TrainConfig().update({"train_data_dir": str(data), "output_dir": str(tmp_path / "out"), "output_name": "hub",
                                 "resolution": "64", "network_dim": 2, "max_train_epochs": 2, "train_batch_size": 2, "seed": 1,
                                 **extra}, source="test")


def run(config, adapter):
    events = []
    path = job.build_trainer(config, adapter).run(events.append)
    return path, events


def test_each_save_and_its_state_are_uploaded_where_sd_scripts_puts_them(tmp_path, tiny_adapter, fake_hub):
    config = config_for(tmp_path, huggingface_repo_id="me/loras", huggingface_path_in_repo="runs/one", huggingface_token="hf_x",
                        save_every_n_epochs=1, save_state=True, save_state_to_huggingface=True)
    path, _ = run(config, tiny_adapter)
    (api,) = fake_hub.made
    assert api.token == "hf_x"
    out = tmp_path / "out"
    assert [c[:5] for c in api.calls] == [
        ("create_repo", "me/loras", None, True, True),  # private: no visibility given
        ("upload_file", "me/loras", None, "runs/one/hub-000001.safetensors", (out / "hub-000001.safetensors").read_bytes()),
        ("upload_folder", "me/loras", None, "runs/one/hub-000001-state", sorted(p.name for p in (out / "hub-000001-state").iterdir())),
        ("upload_file", "me/loras", None, "runs/one/hub.safetensors", path.read_bytes()),
        ("upload_folder", "me/loras", None, "runs/one/hub-state", sorted(p.name for p in (out / "hub-state").iterdir())),
    ]


def test_public_repo_root_and_no_state_without_save_state_to_huggingface(tmp_path, tiny_adapter, fake_hub):
    config = config_for(tmp_path, huggingface_repo_id="me/loras", huggingface_repo_visibility="public",
                        huggingface_repo_type="model", save_state=True, max_train_epochs=1)
    run(config, tiny_adapter)
    (api,) = fake_hub.made
    # public: private=False; no huggingface_path_in_repo: the repository's root; the state stays local
    assert [c[:4] for c in api.calls] == [("create_repo", "me/loras", "model", False), ("upload_file", "me/loras", "model", "hub.safetensors")]
    assert (tmp_path / "out" / "hub-state").is_dir()


def test_a_failed_upload_is_one_line_and_the_files_stay(tmp_path, tiny_adapter, fake_hub):
    fake_hub.fail = OSError("We had trouble connecting to the Hub\n(details)")
    config = config_for(tmp_path, huggingface_repo_id="me/loras", save_every_n_epochs=1)
    path, events = run(config, tiny_adapter)
    notices = [e.text for e in events if isinstance(e, ev.Notice)]
    out = tmp_path / "out"
    assert notices == [
        f"Hugging Face upload of hub-000001.safetensors to me/loras failed (We had trouble connecting to the Hub); the file stays in {out}",
        f"Hugging Face upload of hub.safetensors to me/loras failed (We had trouble connecting to the Hub); the file stays in {out}",
    ]
    assert isinstance(events[-1], ev.Finished) and path.is_file() and (out / "hub-000001.safetensors").is_file()
    assert load_lora(path)[0]


def test_async_upload_sends_epoch_saves_from_a_thread_and_waits_for_the_last(tmp_path, tiny_adapter, fake_hub):
    config = config_for(tmp_path, huggingface_repo_id="me/loras", save_every_n_epochs=1, async_upload=True)
    run(config, tiny_adapter)
    (api,) = fake_hub.made
    uploads = {c[3]: c[5] for c in api.calls if c[0] == "upload_file"}
    main = threading.current_thread().name
    assert uploads["hub-000001.safetensors"] != main  # sent while training went on
    assert uploads["hub.safetensors"] == main  # the last save is sent before the run reports it finished, as in sd-scripts


def test_resume_from_huggingface_downloads_the_state_folder(tmp_path, tiny_adapter, monkeypatch):
    first = config_for(tmp_path / "a", max_train_epochs=None, max_train_steps=2, save_state=True)
    run(first, tiny_adapter)
    state = tmp_path / "a" / "out" / "hub-state"
    calls = []

    def snapshot_download(repo_id, *, repo_type=None, revision=None, token=None, allow_patterns=None):
        calls.append((repo_id, repo_type, revision, token, allow_patterns))
        root = tmp_path / "hf-cache"
        shutil.copytree(state, root / "states" / "hub-state", dirs_exist_ok=True)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    remote = config_for(tmp_path / "b", max_train_epochs=None, max_train_steps=4, resume="me/loras/states/hub-state:v1",
                        resume_from_huggingface=True, huggingface_token="hf_x")
    trainer = job.build_trainer(remote, tiny_adapter)
    resumed = trainer.run()
    # sd-scripts' format: owner/repo/path:revision, repo_type "model" when only the revision is given
    assert calls == [("me/loras", "model", "v1", "hf_x", ["states/hub-state/*"])]
    assert f"resumed from '{tmp_path / 'hf-cache' / 'states' / 'hub-state'}' at step 2 (epoch 2)" in trainer.notes  # 2 images, batch 2: one step an epoch
    local = job.build_trainer(config_for(tmp_path / "c", max_train_epochs=None, max_train_steps=4, resume=str(state)), tiny_adapter).run()
    a, b = load_lora(resumed)[0], load_lora(local)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run as resuming from the local folder


def test_resume_from_huggingface_bad_input_is_one_line(tmp_path, tiny_adapter, monkeypatch):
    with pytest.raises(UserError) as e:
        job.build_trainer(config_for(tmp_path, resume="just-a-folder", resume_from_huggingface=True), tiny_adapter).run()
    assert str(e.value) == "resume 'just-a-folder': with resume_from_huggingface it is owner/repo/path/in/repo[:revision[:repo_type]]"

    def offline(*a, **k):
        raise OSError("Cannot reach https://huggingface.co: offline mode is enabled.\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as e:
        job.build_trainer(config_for(tmp_path, resume="me/loras/s", resume_from_huggingface=True), tiny_adapter).run()
    assert str(e.value) == ("resume: downloading s from Hugging Face repository me/loras failed "
                            "(Cannot reach https://huggingface.co: offline mode is enabled.)")
