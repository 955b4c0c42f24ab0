"""The unified policy as the edge and the learner rely on it: config, model, files, runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet.common.policy.config import PRESETS, PolicyConfig, policy_config
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.runtime import PolicyRunner
from fleet.common.policy.weights import (
    load_state_bytes,
    load_version,
    save_version,
    sha256_hex,
    state_dict_to_bytes,
)
from protos.joint_layout import JOINT_DIM, JOINT_LOWER, JOINT_UPPER

TASKS = ("pick_cube", "touch_target")
CAMERAS = ("overhead", "left_wrist")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny(**overrides: object) -> PolicyConfig:
    return policy_config("tiny", TASKS, CAMERAS, **{"chunk_len": 5, **overrides})


def make_model(seed: int = 0, **overrides: object) -> UnifiedPolicy:
    torch.manual_seed(seed)
    return UnifiedPolicy(tiny(**overrides))


def inputs(b: int = 3, h: int = 24, w: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, len(CAMERAS), h, w, 3), dtype=torch.uint8, generator=g)
    lower, upper = torch.from_numpy(JOINT_LOWER), torch.from_numpy(JOINT_UPPER)
    joints = lower + (upper - lower) * torch.rand(b, JOINT_DIM, generator=g)
    task_id = torch.randint(0, len(TASKS), (b,), generator=g)
    return images, joints, task_id


def perturb(model: UnifiedPolicy) -> UnifiedPolicy:
    """Give the zero-initialised head weights so outputs depend on every input."""
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)
        model.head.bias.normal_(0, 0.1)
    return model


def manifest_for(model: UnifiedPolicy, version_id: str = "v0001") -> Manifest:
    return Manifest(
        version_id=version_id,
        parent=None,
        model_config=model.config.to_dict(),
        training_step=100,
        data_seen=5000,
        sha256="",
    )


# -- config ---------------------------------------------------------------------------------


def test_config_fills_from_preset_and_round_trips_through_json() -> None:
    cfg = tiny(d_model=32)
    assert cfg.d_model == 32  # override wins
    assert cfg.n_layers == PRESETS["tiny"]["n_layers"]
    assert cfg.chunk_len == 5
    again = PolicyConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    direct = PolicyConfig(tasks=TASKS, cameras=CAMERAS, preset="base")
    assert direct.d_model == PRESETS["base"]["d_model"]
    assert direct.image_channels == PRESETS["base"]["image_channels"]


def test_the_chunk_length_comes_with_the_preset_unless_set() -> None:
    """`small` (fleet up's model for MuJoCo cells) plans 30 steps ahead; the others 10; an
    explicit chunk_len wins; a manifest's own chunk_len always rebuilds that version."""
    small = PolicyConfig(tasks=TASKS, cameras=CAMERAS, preset="small")
    assert small.chunk_len == 30
    assert (small.image_size, small.keypoints, small.shift_augment) == ((96, 128), 16, 4)
    assert PolicyConfig(tasks=TASKS, cameras=CAMERAS).chunk_len == 10
    assert policy_config("small", TASKS, CAMERAS, chunk_len=12).chunk_len == 12
    old = {**small.to_dict(), "chunk_len": 10}
    assert PolicyConfig.from_dict(old).chunk_len == 10
    model = UnifiedPolicy(small)
    images = torch.zeros(1, len(CAMERAS), 120, 160, 3, dtype=torch.uint8)
    out = model(images, torch.zeros(1, 14), torch.zeros(1, dtype=torch.int64))
    assert out.shape == (1, 30, 14)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "huge"}, "unknown policy preset"),
        ({"tasks": "pick_cube"}, "not one string"),
        ({"tasks": ("a", "a")}, "duplicate task"),
        ({"cameras": ()}, "cameras"),
        ({"d_model": 30, "n_heads": 4}, "divisible"),
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"tasks": TASKS, "cameras": CAMERAS}
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_config_from_dict_rejects_unknown_keys() -> None:
    d = tiny().to_dict()
    d["use_magic"] = True
    with pytest.raises(ValueError, match="use_magic"):
        PolicyConfig.from_dict(d)


def test_manifest_config_without_newer_fields_rebuilds_the_old_network() -> None:
    """Versions published before keypoints and shift augmentation existed still load as the
    network they were trained as, whatever the presets say today."""
    old = tiny().to_dict()
    for key in ("keypoints", "shift_augment"):
        old.pop(key)
    cfg = PolicyConfig.from_dict(old)
    assert (cfg.keypoints, cfg.shift_augment) == (0, 0)
    assert set(UnifiedPolicy(cfg).state_dict()) == {k for k in make_model(keypoints=0).state_dict()}
    with_kp = tiny(keypoints=6, shift_augment=3)
    assert PolicyConfig.from_dict(json.loads(json.dumps(with_kp.to_dict()))) == with_kp


def test_command_line_policy_settings_parse_to_config_fields() -> None:
    from fleet.common.policy.config import parse_overrides

    got = parse_overrides(["keypoints=16", "image_size=[96,128]", "preset=tiny"])
    assert got == {"keypoints": 16, "image_size": [96, 128], "preset": "tiny"}
    assert tiny(**{k: v for k, v in got.items() if k != "preset"}).image_size == (96, 128)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["keypoints"])
    with pytest.raises(ValueError, match="use_magic"):
        parse_overrides(["use_magic=1"])


def test_presets_have_the_promised_scale() -> None:
    counts = {
        name: UnifiedPolicy(policy_config(name, TASKS, CAMERAS)).num_parameters()
        for name in ("tiny", "base", "large")
    }
    assert 50_000 < counts["tiny"] < 1_000_000
    assert 10_000_000 < counts["base"] < 100_000_000
    assert counts["large"] >= 100_000_000


# -- model ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(24, 32), (96, 128), (17, 50)])
def test_forward_shapes_for_any_image_size(h: int, w: int) -> None:
    model = perturb(make_model()).eval()
    images, joints, task_id = inputs(b=3, h=h, w=w)
    out = model(images, joints, task_id)
    assert out.shape == (3, 5, JOINT_DIM)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_keypoints_locate_what_they_see() -> None:
    """Spatial-softmax keypoints follow an image feature: a bright spot moved right moves
    the keypoint right, and the network's output changes with it."""
    from fleet.common.policy.model import SpatialSoftmax

    soft = SpatialSoftmax(channels=1, keypoints=1)
    with torch.no_grad():
        soft.maps.weight.fill_(1.0)
        soft.maps.bias.zero_()
        soft.log_temperature.fill_(-3.0)  # sharp
    features = torch.zeros(2, 1, 6, 8)
    features[0, 0, 2, 1] = 1.0
    features[1, 0, 2, 6] = 1.0
    with torch.no_grad():
        xy = soft(features)
    assert xy.shape == (2, 1, 2)
    assert float(xy[0, 0, 0]) < -0.5 < 0.5 < float(xy[1, 0, 0])
    assert abs(float(xy[0, 0, 1]) - float(xy[1, 0, 1])) < 1e-5
    model = perturb(make_model(keypoints=4)).eval()
    images, joints, task_id = inputs(b=2, h=24, w=32)
    moved = torch.roll(images, shifts=8, dims=3)
    assert not torch.allclose(model(images, joints, task_id), model(moved, joints, task_id))


def test_keypoints_can_read_an_earlier_finer_stage() -> None:
    """keypoint_stage=0 puts the spatial softmax on the first stage's map (half the input
    resolution, not 1/8): the same network otherwise, and old manifests keep the last."""
    fine = make_model(keypoints=4, keypoint_stage=0)
    coarse = make_model(keypoints=4)
    assert coarse.config.keypoint_stage == -1
    assert fine.image_encoder.keypoints is not None
    assert fine.image_encoder.keypoints.maps.in_channels == fine.config.image_channels[0]
    assert set(fine.state_dict()) == set(coarse.state_dict())
    seen: list[tuple[int, ...]] = []
    fine.image_encoder.keypoints.register_forward_hook(
        lambda _m, args, _out: seen.append(tuple(args[0].shape[-2:]))
    )
    images, joints, task_id = inputs(b=1, h=24, w=32)
    with torch.no_grad():
        fine(images, joints, task_id)
    h, w = fine.config.image_size
    assert seen == [(h // 2, w // 2)]  # every camera in one batch
    old = tiny().to_dict()
    old.pop("keypoint_stage")
    assert PolicyConfig.from_dict(old).keypoint_stage == -1
    for bad in (3, -4):
        with pytest.raises(ValueError, match="keypoint_stage"):
            tiny(keypoint_stage=bad)


def test_shift_augmentation_only_while_training() -> None:
    model = perturb(make_model(shift_augment=4))
    images, joints, task_id = inputs(b=4, h=48, w=64)
    model.eval()
    assert torch.equal(model(images, joints, task_id), model(images, joints, task_id))
    model.train()
    torch.manual_seed(1)
    first = model(images, joints, task_id)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(images, joints, task_id))


def test_random_shift_moves_whole_images_by_at_most_pad() -> None:
    from fleet.common.policy.model import random_shift

    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    torch.manual_seed(0)
    y = random_shift(x, 2)
    assert y.shape == x.shape
    for i in range(2):
        # Some offset within [-2, 2] explains every interior pixel of the shifted image.
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(y[i, :, 2:-2, 2:-2], x[i, :, 2 + dy : 8 + dy, 2 + dx : 10 + dx])
        ]
        assert len(found) == 1


def test_untrained_policy_holds_position() -> None:
    """A fresh version must not drive the arms anywhere: its chunk is the current pose."""
    model = make_model().eval()
    images, joints, task_id = inputs()
    out = model(images, joints, task_id)
    torch.testing.assert_close(out, joints[:, None, :].expand_as(out), atol=1e-5, rtol=0)


def test_output_depends_on_images_joints_and_task() -> None:
    model = perturb(make_model()).eval()
    images, joints, task_id = inputs(b=2)
    base = model(images, joints, task_id)
    assert not torch.allclose(base, model(255 - images, joints, task_id))
    assert not torch.allclose(base, model(images, joints * 0.5, task_id))
    assert not torch.allclose(base, model(images, joints, 1 - task_id))


def test_joint_normalisation_maps_limits_to_unit_range() -> None:
    model = make_model()
    lower, upper = torch.from_numpy(JOINT_LOWER), torch.from_numpy(JOINT_UPPER)
    torch.testing.assert_close(model.normalize_joints(lower), -torch.ones(JOINT_DIM))
    torch.testing.assert_close(model.normalize_joints(upper), torch.ones(JOINT_DIM))
    x = inputs()[1]
    torch.testing.assert_close(model.denormalize_joints(model.normalize_joints(x)), x)


def test_unknown_task_and_wrong_camera_count_are_clear_errors() -> None:
    model = make_model()
    assert model.task_index("touch_target") == 1
    with pytest.raises(ValueError, match=r"unknown task 'fold_towel'.*pick_cube"):
        model.task_index("fold_towel")
    images, joints, task_id = inputs()
    with pytest.raises(ValueError, match="overhead"):
        model(images[:, :1], joints, task_id)
    with pytest.raises(ValueError, match="uint8"):
        model(images.float(), joints, task_id)


def _bc_batch(b: int = 4, k: int = 5) -> dict[str, torch.Tensor]:
    images, joints, task_id = inputs(b=b)
    return {
        "images": images,
        "joint_pos": joints,
        "task_id": task_id,
        "actions": joints[:, None, :].repeat(1, k, 1) + 0.3,
        "action_mask": torch.ones(b, k),
        "weight": torch.ones(b),
    }


def test_bc_loss_ignores_padding_and_honours_weights() -> None:
    model = perturb(make_model()).eval()
    batch = _bc_batch()
    loss, metrics = model.bc_loss(batch)
    assert loss.ndim == 0 and loss.requires_grad
    assert metrics["loss"] == pytest.approx(loss.item())
    assert {"abs_err_rad", "l1_normalized"} <= set(metrics)

    padded = dict(batch)
    padded["action_mask"] = batch["action_mask"].clone()
    padded["action_mask"][:, 3:] = 0.0
    garbage = dict(padded)
    garbage["actions"] = batch["actions"].clone()
    garbage["actions"][:, 3:] = 100.0  # past the episode end: must not count
    assert model.bc_loss(garbage)[0].item() == pytest.approx(model.bc_loss(padded)[0].item())

    ignored = dict(batch)
    ignored["weight"] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ignored["actions"] = batch["actions"].clone()
    ignored["actions"][3] = 100.0  # zero weight: must not count
    only_three = {k: v[:3] for k, v in batch.items()}
    assert model.bc_loss(ignored)[0].item() == pytest.approx(model.bc_loss(only_three)[0].item())


def test_huber_arm_joints_keep_learning_where_most_samples_hold_still() -> None:
    """With plain L1, a sample whose joint holds still pulls a small prediction back to zero
    as hard as a moving one pulls it away (the right waist stayed dead in every MuJoCo run);
    with huber_beta the pull of holding still fades near zero. Grippers stay L1."""
    from protos.joint_layout import GRIPPER_INDICES

    waist, gripper = 7, GRIPPER_INDICES[1]
    grads = {}
    for beta in (0.0, 1.0):
        model = make_model(huber_beta=beta, action_scale=(0.05,) * JOINT_DIM).eval()
        batch = _bc_batch()
        with torch.no_grad():  # targets: exactly where the arm already is ...
            batch["actions"][:] = batch["joint_pos"][:, None, :]
            model.head.bias[waist] = 0.01  # ... and a small predicted motion of two joints
            model.head.bias[gripper] = 0.01
        loss, _ = model.bc_loss(batch)
        loss.backward()
        grads[beta] = [float(g) for g in model.head.bias.grad]
    # L1: the pull back is the full sign; Huber: a hundredth of it (0.01 of beta 1).
    assert grads[1.0][waist] == pytest.approx(grads[0.0][waist] * 0.01, rel=1e-3)
    assert grads[1.0][gripper] == pytest.approx(grads[0.0][gripper], rel=1e-6)
    # Far errors cost the same per unit either way (no squared blow-up on big misses).
    big = _bc_batch()
    model = make_model(huber_beta=1.0, action_scale=(0.05,) * JOINT_DIM).eval()
    with torch.no_grad():
        big["actions"][:] = big["joint_pos"][:, None, :]
        big["actions"][..., waist] += 1.0  # 0.33 of the waist's range: 6.7 scale units
    l1_model = make_model(huber_beta=0.0, action_scale=(0.05,) * JOINT_DIM).eval()
    assert model.bc_loss(big)[0].item() == pytest.approx(
        l1_model.bc_loss(big)[0].item() - 0.5 / JOINT_DIM, rel=1e-4
    )


def test_huber_beta_comes_with_the_preset_and_old_manifests_keep_l1() -> None:
    assert policy_config("small", TASKS, CAMERAS).huber_beta == 1.0
    assert tiny().huber_beta == 0.0
    old = policy_config("small", TASKS, CAMERAS).to_dict()
    old.pop("huber_beta")  # a version trained before the field existed was trained on L1
    assert PolicyConfig.from_dict(old).huber_beta == 0.0
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="huber_beta"):
            tiny(huber_beta=bad)


# -- weights and manifests ------------------------------------------------------------------


def test_safetensors_round_trip_is_bit_exact() -> None:
    source = perturb(make_model(seed=1))
    data = state_dict_to_bytes(source)
    target = make_model(seed=2)
    load_state_bytes(target, data)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    assert state_dict_to_bytes(target) == data
    images, joints, task_id = inputs()
    assert torch.equal(
        source.eval()(images, joints, task_id), target.eval()(images, joints, task_id)
    )


def test_loading_weights_of_another_architecture_is_refused() -> None:
    data = state_dict_to_bytes(make_model())
    with pytest.raises(ValueError, match="queries"):
        load_state_bytes(make_model(chunk_len=7), data)
    with pytest.raises(ValueError, match="safetensors"):
        load_state_bytes(make_model(), b"\x00not safetensors at all")


def test_manifest_json_round_trip() -> None:
    m = Manifest(
        version_id="v0007",
        parent="v0006",
        model_config=tiny().to_dict(),
        training_step=1234,
        data_seen=98765,
        sha256="ab" * 32,
        signature="sig",
        created_at=1700000000.5,
        parameter_count=42,
        evaluation={"pick_cube": {"success": 3, "trials": 4}},
    )
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert Manifest.from_json(manifest_for(make_model()).to_json()).parent is None
    with pytest.raises(ValueError, match="sha256"):
        Manifest.from_json(json.dumps({"version_id": "v1", "model_config": {}}))
    with pytest.raises(ValueError, match="JSON"):
        Manifest.from_json("{not json")


def test_save_and_load_version(tmp_path: Path) -> None:
    model = perturb(make_model(seed=3))
    manifest = manifest_for(model)
    weights_path, manifest_path = save_version(tmp_path, model, manifest)
    assert weights_path.name == "v0001.safetensors" and manifest_path.name == "v0001.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0001.json", "v0001.safetensors"]

    data = weights_path.read_bytes()
    stored = Manifest.from_json(manifest_path.read_text())
    assert stored.sha256 == sha256_hex(data) == manifest.sha256
    assert stored.parameter_count == model.num_parameters() > 0

    loaded = load_version(data, stored)
    assert not loaded.training
    images, joints, task_id = inputs()
    assert torch.equal(loaded(images, joints, task_id), model.eval()(images, joints, task_id))


def test_load_version_rejects_tampered_weights(tmp_path: Path) -> None:
    model = make_model()
    weights_path, manifest_path = save_version(tmp_path, model, manifest_for(model))
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0x01
    with pytest.raises(ValueError, match="sha256"):
        load_version(bytes(data), Manifest.from_json(manifest_path.read_text()))


def test_save_version_refuses_unsafe_version_ids(tmp_path: Path) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="file name"):
        save_version(tmp_path, model, manifest_for(model, version_id="../escape"))


# -- edge runtime ---------------------------------------------------------------------------


def _frames(h: int = 24, w: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {cam: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for cam in CAMERAS}


def test_runner_predicts_a_chunk_within_limits() -> None:
    runner = PolicyRunner(perturb(make_model()), "v0001")
    assert runner.version_id == "v0001" and runner.config.cameras == CAMERAS
    joints = np.zeros(JOINT_DIM, np.float32)
    chunk = runner.predict(_frames(), joints, "pick_cube")
    assert chunk.shape == (5, JOINT_DIM) and chunk.dtype == np.float32
    assert np.all(chunk >= JOINT_LOWER) and np.all(chunk <= JOINT_UPPER)
    frames = _frames()
    frames["front"] = np.zeros((10, 10, 3), np.uint8)  # an extra camera is ignored
    frames["left_wrist"] = np.zeros((48, 64, 3), np.uint8)  # mixed resolutions are fine
    assert runner.predict(frames, joints, "touch_target").shape == (5, JOINT_DIM)


def test_runner_matches_the_batched_model() -> None:
    model = perturb(make_model())
    runner = PolicyRunner(model, "v0001")
    images, joints, _ = inputs(b=1)
    frames = {cam: images[0, i].numpy() for i, cam in enumerate(CAMERAS)}
    chunk = runner.predict(frames, joints[0].numpy(), "touch_target")
    with torch.no_grad():
        expected = model(images, joints, torch.tensor([1]))[0].numpy()
    np.testing.assert_allclose(chunk, np.clip(expected, JOINT_LOWER, JOINT_UPPER), atol=1e-6)


def test_runner_errors_name_what_is_wrong() -> None:
    runner = PolicyRunner(make_model(), "v0001")
    joints = np.zeros(JOINT_DIM, np.float32)
    frames = _frames()
    del frames["left_wrist"]
    with pytest.raises(ValueError, match="left_wrist"):
        runner.predict(frames, joints, "pick_cube")
    with pytest.raises(ValueError, match="unknown task 'dance'"):
        runner.predict(_frames(), joints, "dance")
    bad = _frames()
    bad["overhead"] = bad["overhead"].astype(np.float32)
    with pytest.raises(ValueError, match="overhead"):
        runner.predict(bad, joints, "pick_cube")
    with pytest.raises(ValueError, match="joint_pos"):
        runner.predict(_frames(), np.zeros(7, np.float32), "pick_cube")


def test_runner_from_version_checks_the_digest(tmp_path: Path) -> None:
    model = make_model()
    weights_path, manifest_path = save_version(tmp_path, model, manifest_for(model, "v0002"))
    manifest = Manifest.from_json(manifest_path.read_text())
    runner = PolicyRunner.from_version(weights_path.read_bytes(), manifest)
    assert runner.version_id == "v0002"
    with pytest.raises(ValueError, match="sha256"):
        PolicyRunner.from_version(weights_path.read_bytes() + b" ", manifest)


def test_policy_package_imports_no_ray() -> None:
    """The edge installs no Ray: fleet.common.policy must never pull it in."""
    code = (
        "import sys, fleet.common.policy.runtime, fleet.common.policy.weights,"
        " fleet.common.policy.config;"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
