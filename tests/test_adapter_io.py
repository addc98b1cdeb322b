"""Adapter and mask files: atomic saves, and loads that either fit completely or change nothing."""

import json
import struct

import pytest
import torch
from torch import nn

from rosa_kernels import RosaConfig, RosaLinear, RosaModel, get_rosa_model, load_masks, save_masks, select_mask
from rosa_kernels.masks import load_safetensors, save_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")


def make_base(hidden=16, inputs=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 1))


CONFIG = RosaConfig(rank=2, density=0.1, warmup_steps=2, collect_steps=1, dropout=0.0, target_modules=["0", "2"])


def trained(config=CONFIG, steps=5, seed=0, **base_kwargs):
    model = get_rosa_model(make_base(**base_kwargs), config)
    scheduler = model.scheduler(show_progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, model.base_model[0].in_features, generator=gen)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model


def snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    phases = {n: m.phase for n, m in model.named_modules() if isinstance(m, RosaLinear)}
    return state, phases


def assert_unchanged(model, before):
    state, phases = snapshot(model)
    assert phases == before[1]
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key


def file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------------------------
# Atomic saves
# ----------------------------------------------------------------------------------------------


def failing_save_file(tensors, filename, metadata=None):
    """safetensors' writer that dies halfway through the file (a full disk, a kill)."""
    data = safetensors_torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError("No space left on device (injected)")


def test_a_failed_save_pretrained_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    model = trained()
    model.save_pretrained(tmp_path)
    before = file_bytes(tmp_path)
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors"}
    more = trained(steps=7, seed=1)  # a different adapter: the files would change
    monkeypatch.setattr(safetensors_torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="injected"):
        more.save_pretrained(tmp_path)
    assert file_bytes(tmp_path) == before  # byte-identical, and no temporary file left behind
    loaded = RosaModel.from_pretrained(make_base(), tmp_path)
    for name, layer in model.rosa_layers().items():
        assert torch.equal(loaded.rosa_layers()[name].sparse_values, layer.sparse_values)
    monkeypatch.undo()
    more.save_pretrained(tmp_path)
    assert file_bytes(tmp_path) != before and set(file_bytes(tmp_path)) == set(before)


def test_a_failed_config_write_replaces_neither_file(tmp_path, monkeypatch):
    model = trained()
    model.save_pretrained(tmp_path)
    before = file_bytes(tmp_path)
    more = trained(steps=7, seed=1)

    def failing_write_text(self, *args, **kwargs):
        raise OSError("injected")

    monkeypatch.setattr(type(tmp_path), "write_text", failing_write_text)
    with pytest.raises(OSError, match="injected"):
        more.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert file_bytes(tmp_path) == before


def test_a_failed_save_masks_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "masks.safetensors"
    save_masks(path, {"a": select_mask(torch.randn(6, 5), 4)})
    before = file_bytes(tmp_path)
    monkeypatch.setattr(safetensors_torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="injected"):
        save_masks(path, {"a": select_mask(torch.randn(6, 5), 9)})
    with pytest.raises(OSError, match="injected"):
        trained().save_masks(path)
    assert file_bytes(tmp_path) == before
    with pytest.raises(OSError, match="injected"):  # a first save that fails leaves nothing
        save_masks(tmp_path / "new.safetensors", {"a": select_mask(torch.randn(6, 5), 4)})
    assert file_bytes(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Mismatched adapters: a ValueError naming the layer, the model unchanged
# ----------------------------------------------------------------------------------------------

MISMATCHES = {
    "shape": ({}, {"hidden": 12}, "0 is 12x10 here"),
    "rank": ({"rank": 3}, {}, "rank"),
    "density": ({"density": 0.2}, {}, "sparse values"),
    "targets": ({"target_modules": ["0"]}, {}, "targeted layers|layers missing"),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_load_adapter_of_another_model_raises_and_changes_nothing(tmp_path, kind):
    overrides, base_kwargs, message = MISMATCHES[kind]
    trained().save_pretrained(tmp_path)
    # A model in the sparse phase with its own trained adapter: nothing of it may change.
    target = trained(RosaConfig(**{**CONFIG.to_dict(), **overrides}), seed=3, **base_kwargs)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_adapter(tmp_path)
    assert_unchanged(target, before)


def test_from_pretrained_into_another_shape_changes_nothing(tmp_path):
    trained().save_pretrained(tmp_path)
    base = make_base(hidden=12)
    before = snapshot(base)
    with pytest.raises(ValueError, match="does not fit"):
        RosaModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, RosaLinear) for m in base.modules())
    assert_unchanged(base, before)


def test_load_masks_of_another_density_changes_nothing(tmp_path):
    trained().save_masks(tmp_path / "masks.safetensors")
    target = trained(RosaConfig(**{**CONFIG.to_dict(), "density": 0.2}), seed=3)
    before = snapshot(target)
    with pytest.raises(ValueError, match="nonzeros"):
        target.load_masks(tmp_path / "masks.safetensors")
    assert_unchanged(target, before)


# ----------------------------------------------------------------------------------------------
# Damaged files: a clear error, never a crash or a partial load
# ----------------------------------------------------------------------------------------------


def rewrite_tensors(directory, change):
    tensors, metadata = load_safetensors(directory / "adapter_model.safetensors")
    change(tensors)
    save_safetensors(tensors, directory / "adapter_model.safetensors", metadata)


def corrupt(directory, how):
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif how == "truncated header":
        weights.write_bytes(weights.read_bytes()[:20])
    elif how == "empty weights":
        weights.write_bytes(b"")
    elif how == "garbage weights":
        weights.write_bytes(bytes(range(256)) * 4)
    elif how == "garbage config":
        config.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "truncated config":
        config.write_text(config.read_text()[:50])
    elif how == "config without layers":
        config.write_text(json.dumps({"rank": 2}))
    elif how == "invalid config value":
        config.write_text(config.read_text().replace('"rank": 2', '"rank": -1'))
    elif how == "mask index out of range":
        rewrite_tensors(directory, lambda t: t["2.col_indices"].fill_(99))
    elif how == "missing tensor":
        rewrite_tensors(directory, lambda t: t.pop("2.lora_B"))
    elif how == "incomplete mask":
        rewrite_tensors(directory, lambda t: t.pop("2.row_indices"))
    elif how == "stray tensor":
        rewrite_tensors(directory, lambda t: t.update({"4.lora_A": torch.zeros(2, 16)}))
    elif how == "wrong dtype":
        rewrite_tensors(directory, lambda t: t.update({"2.col_indices": t["2.col_indices"].float()}))
    else:
        raise AssertionError(how)


DAMAGES = ["truncated weights", "truncated header", "empty weights", "garbage weights", "garbage config",
           "truncated config", "config without layers", "invalid config value", "mask index out of range",
           "missing tensor", "incomplete mask", "stray tensor", "wrong dtype"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_adapter_is_a_clear_error_and_changes_nothing(tmp_path, how):
    trained().save_pretrained(tmp_path)
    corrupt(tmp_path, how)
    base = make_base()
    before = snapshot(base)
    with pytest.raises(ValueError) as error:
        RosaModel.from_pretrained(base, tmp_path)
    assert "adapter" in str(error.value) or str(tmp_path) in str(error.value)
    assert not any(isinstance(m, RosaLinear) for m in base.modules())
    assert_unchanged(base, before)
    wrapped = trained(seed=3)
    before = snapshot(wrapped)
    with pytest.raises(ValueError):
        wrapped.load_adapter(tmp_path)
    assert_unchanged(wrapped, before)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors", "directory"])
def test_a_missing_file_names_the_directory_and_the_file(tmp_path, missing):
    directory = tmp_path / "adapter"
    trained().save_pretrained(directory)
    if missing == "directory":
        directory = tmp_path / "nowhere"
    else:
        (directory / missing).unlink()
    base = make_base()
    with pytest.raises(FileNotFoundError) as error:
        RosaModel.from_pretrained(base, directory)
    assert str(directory) in str(error.value)
    assert (missing if missing != "directory" else "adapter_config.json") in str(error.value)
    assert not any(isinstance(m, RosaLinear) for m in base.modules())


@pytest.mark.parametrize("how", ["truncated", "garbage", "bad structure in the second mask"])
def test_a_damaged_mask_file_is_a_clear_error_and_changes_nothing(tmp_path, how):
    path = tmp_path / "masks.safetensors"
    trained().save_masks(path)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    elif how == "garbage":
        path.write_bytes(b"\x00" * 7 + b"\xff" * 100)
    else:
        tensors, metadata = load_safetensors(path)
        tensors["2.row_offsets"][-1] += 1  # the second layer's offsets no longer end at nnz
        save_safetensors(tensors, path, metadata)
    with pytest.raises(ValueError, match="masks.safetensors"):
        load_masks(path)
    target = get_rosa_model(make_base(), CONFIG)
    before = snapshot(target)
    with pytest.raises(ValueError):
        target.load_masks(path)
    assert_unchanged(target, before)


def test_files_in_the_earlier_hand_written_format_still_load(tmp_path):
    """Earlier releases wrote safetensors by hand (JSON header padded with spaces to 8 bytes)."""
    row_offsets = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    col_indices = torch.tensor([2, 0, 1], dtype=torch.int32)
    row_indices = torch.tensor([2, 0, 1], dtype=torch.int32)
    blobs, header, offset = [], {"__metadata__": {"format": "rosa_kernels.masks", "shapes": '{"m": [3, 4]}'}}, 0
    for name, t in (("m.row_offsets", row_offsets), ("m.col_indices", col_indices), ("m.row_indices", row_indices)):
        data = t.numpy().tobytes()
        header[name] = {"dtype": "I32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    (tmp_path / "old.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    mask = load_masks(tmp_path / "old.safetensors")["m"]
    assert mask.shape == (3, 4)
    assert torch.equal(mask.row_offsets, row_offsets) and torch.equal(mask.col_indices, col_indices)
    assert torch.equal(mask.row_indices, row_indices)
