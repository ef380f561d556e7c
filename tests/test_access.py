"""The folder guard: `..`, symlinks out of a root, absolute paths elsewhere and Unicode paths, in
local and in listening mode."""

from __future__ import annotations

import pytest

from lora_train.access import AccessPolicy
from lora_train.errors import UserError


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "webui" / "train"
    (root / "10_角色").mkdir(parents=True)
    (root / "sub" / "deep").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "link-in").symlink_to(root / "sub", target_is_directory=True)
    return root, outside


def _policies(root):
    local = AccessPolicy.build([root])
    listening = AccessPolicy.build([root], remote=True)
    return local, listening


def test_inside_the_roots_every_mode_allows_real_paths(tree):
    root, _ = tree
    for policy in _policies(root) + (AccessPolicy.build([root], remote=True, insecure_allowed=True),):
        assert policy.folder(root / "10_角色") == (root / "10_角色").resolve()
        assert policy.folder(str(root / "sub" / ".." / "10_角色")) == (root / "10_角色").resolve()
        assert policy.folder(root / "link-in" / "deep") == (root / "sub" / "deep").resolve()  # the link's target
        assert policy.folder(root) == root.resolve()


@pytest.mark.parametrize("escape", ["..", "../..", "sub/../../..", "link-out", "link-out/."])
def test_listening_refuses_dot_dot_and_symlinks_out_of_the_root(tree, escape):
    root, outside = tree
    local, listening = _policies(root)
    assert local.folder(root / escape).is_dir()  # locally the user owns the machine
    with pytest.raises(UserError, match="outside the allowed folders.*--enable-insecure-extension-access"):
        listening.folder(root / escape)
    with pytest.raises(UserError, match="outside the allowed folders"):
        listening.folder(escape)  # relative: taken from the first root, and still refused


def test_listening_refuses_absolute_paths_elsewhere_and_names_them(tree):
    root, outside = tree
    local, listening = _policies(root)
    assert local.folder(outside) == outside.resolve()
    for path in (outside, "/", "/etc", str(outside) + "/../private"):
        with pytest.raises(UserError, match="outside the allowed folders") as e:
            listening.folder(path)
        assert str(path) in str(e.value) and str(root.resolve()) in str(e.value)


def test_relative_paths_in_listening_mode_are_under_the_first_root(tree):
    root, _ = tree
    _, listening = _policies(root)
    assert listening.folder("10_角色") == (root / "10_角色").resolve()


def test_unicode_and_missing_folders(tree):
    root, _ = tree
    local, listening = _policies(root)
    with pytest.raises(UserError, match="no such folder"):
        local.folder(root / "不存在")
    with pytest.raises(UserError, match="no such folder"):
        listening.folder(root / "不存在")
    assert listening.folder(root / "不存在", must_exist=False) == (root / "不存在").resolve()
    with pytest.raises(UserError, match="no folder given"):
        local.folder("  ")


def test_moves_and_downloads_are_refused_only_when_listening_without_the_insecure_flag(tree):
    root, _ = tree
    local, listening = _policies(root)
    local.check_changes_files("moving images")
    AccessPolicy.build([root], remote=True, insecure_allowed=True).check_changes_files("moving images")
    with pytest.raises(UserError, match="moving images is not allowed.*--enable-insecure-extension-access"):
        listening.check_changes_files("moving images")


def test_hide_ui_dir_config_keeps_folders_to_the_roots_locally(tree):
    root, outside = tree
    hidden = AccessPolicy.build([root], hide_dirs=True)
    with pytest.raises(UserError, match="--hide-ui-dir-config"):
        hidden.folder(outside)
    hidden.check_changes_files("moving images")  # local: files may still change
    assert AccessPolicy.build([root], remote=True, insecure_allowed=True).folder(outside) == outside.resolve()
