"""ONNX and TorchScript export: outputs match fp32 PyTorch on real X-rays, the contract travels in the file, and the
ONNX Runtime backend serves ``cxr predict --backend onnx`` and the web service. Tiny 64 px checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import torch  # noqa: E402

from cxr.config import load_config  # noqa: E402
from cxr.demo import SAMPLE_DIR  # noqa: E402
from cxr.errors import CheckpointError, UsageError  # noqa: E402
from cxr.evaluate import predict_logits, probabilities  # noqa: E402
from cxr.export import (  # noqa: E402
    CONTRACT_KEY,
    OnnxPredictor,
    export_model,
    load_onnx_predictor,
    load_torchscript,
    predict_files_onnx,
)
from cxr.images import load_image  # noqa: E402
from cxr.model import Checkpoint, build_model, load_checkpoint, save_checkpoint  # noqa: E402
from cxr.predict import predict_files  # noqa: E402

SIZE = 64
THRESHOLD = 0.42
FILES = sorted((SAMPLE_DIR / "test").glob("*/*.jpeg"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint with its ONNX and TorchScript exports, and fp32 PyTorch results on the 16 sample X-rays."""
    root = tmp_path_factory.mktemp("export")
    ckpt_path = tiny_checkpoint(root / "tiny.pt", "densenet121")
    images = np.stack([load_image(f, SIZE) for f in FILES])
    logits = fp32_logits(ckpt_path, images)
    return {
        "ckpt": ckpt_path,
        "onnx": export_model(load_checkpoint(ckpt_path), "onnx", root / "model.onnx"),
        "images": images,
        "logits": logits.numpy(),
        "probs": probabilities(logits),
        "id": hashlib.sha256(ckpt_path.read_bytes()).hexdigest()[:12],
    }


def tiny_checkpoint(path, arch: str):
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": SIZE, "arch": arch})
    save_checkpoint(Checkpoint(arch, build_model(arch, "none").state_dict(), cfg, threshold=THRESHOLD), path)
    return path


def fp32_logits(ckpt_path, images) -> torch.Tensor:
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.config
    return predict_logits(ckpt.build("cpu"), images, mean=cfg.mean, std=cfg.std, device=torch.device("cpu"),
                          bf16=False)


def test_onnx_matches_pytorch_fp32_on_real_xrays(exported):
    probs = OnnxPredictor(exported["onnx"]).predict_uint8(exported["images"], batch_size=5)  # uneven last batch
    assert probs.shape == (len(FILES),)
    assert np.abs(probs - exported["probs"]).max() < 1e-4
    # A comparison of near-constant outputs would prove little: these differ from image to image.
    assert exported["probs"].std() > 1e-3
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    logits, softmax = session.run(None, {"image": exported["images"][:, None]})
    assert np.abs(logits - exported["logits"]).max() < 1e-3
    assert np.allclose(softmax.sum(axis=1), 1.0, atol=1e-6)


def test_onnx_file_carries_the_preprocessing_contract(exported):
    model = onnx.load(str(exported["onnx"]))
    meta = {p.key: p.value for p in model.metadata_props}
    contract = json.loads(meta[CONTRACT_KEY])
    assert contract["image_size"] == SIZE
    assert contract["mean"] == pytest.approx(0.449) and contract["std"] == pytest.approx(0.226)
    assert contract["threshold"] == pytest.approx(THRESHOLD)
    assert contract["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert contract["model_id"] == exported["id"]
    assert "Not for diagnosis" in contract["model_card"]["intended_use"]
    # the rule a consumer applies, ties included, and the class it names (a tie had to be read from cxr's source)
    assert contract["decision"] == "PNEUMONIA when probabilities[:, -1] >= threshold"
    assert contract["model_card"]["positive_class"] == "PNEUMONIA"
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [1, SIZE, SIZE] and isinstance(dims[0], str)  # any batch size
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    assert any("EXIF Orientation" in step for step in contract["decoding"])  # it had said "grey levels 0-255" alone


def test_the_contracts_stretch_as_written_gives_cxrs_pixels(tmp_path):
    # A system without cxr follows the contract's words: a 12-bit image in a 16-bit PNG, with a hot and a dead pixel
    # and 1.5 million pixels (so the sample is every n-th), decoded as written, must be what cxr decodes.
    from PIL import Image

    from cxr.export import DECODING
    from cxr.images import read_grayscale

    assert any("0.01th and 99.99th percentile" in step for step in DECODING)
    rng = np.random.default_rng(0)
    raw = rng.integers(200, 3800, (1000, 1500)).astype(np.uint16)
    raw[3, 7], raw[9, 11] = 65535, 0
    Image.fromarray(raw).save(tmp_path / "x.png")
    flat = raw.reshape(-1)
    n = max(1, flat.size // 1_000_000)
    while np.gcd(n, raw.shape[1]) != 1:
        n += 1
    sample = np.sort(flat[::n])
    k = int(np.floor(0.0001 * sample.size))
    lo, hi = float(sample[k]), float(sample[sample.size - 1 - k])
    expected = np.clip(np.rint((raw.astype(np.float32) - lo) * np.float32(255.0 / (hi - lo))), 0, 255)
    np.testing.assert_array_equal(read_grayscale(tmp_path / "x.png"), expected.astype(np.uint8))


def test_torchscript_matches_pytorch_and_carries_the_contract(exported, tmp_path):
    # The export code is the same for every arch; ResNet-18 traces and loads in a fraction of DenseNet-121's time.
    ckpt_path = tiny_checkpoint(tmp_path / "resnet.pt", "resnet18")
    module, contract = load_torchscript(export_model(ckpt_path, "torchscript", tmp_path / "model.ts"))
    images = exported["images"][:4]
    expected = fp32_logits(ckpt_path, images)
    with torch.no_grad():
        logits, probs = module(torch.from_numpy(images[:, None]))
    assert np.abs(logits.numpy() - expected.numpy()).max() < 1e-4
    assert np.abs(probs[:, 1].numpy() - probabilities(expected)).max() < 1e-5
    assert contract["image_size"] == SIZE and contract["threshold"] == pytest.approx(THRESHOLD)
    assert contract["arch"] == "resnet18"
    assert contract["model_id"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()[:12]


def test_cxr_predict_on_an_onnx_file_runs_without_torch(exported, tmp_path):
    # `import torch` alone takes 1.3 to 2.4 s (BENCHMARKS.md, figure 4b); an exported model needs none of it. Here torch
    # cannot be imported at all, and the command must still predict, print its table and write its file.
    import subprocess
    import sys

    out = tmp_path / "p.csv"
    code = ("import sys; sys.modules['torch'] = None; from cxr.cli import main; "
            f"sys.exit(main(['predict', '--backend', 'onnx', '--model', {str(exported['onnx'])!r}, "
            f"{str(FILES[0])!r}, {str(FILES[-1])!r}, '--output', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "halted" not in proc.stderr and "2 file(s)" in proc.stderr
    assert FILES[0].name in proc.stdout and "not a medical device" in proc.stdout + proc.stderr
    rows = out.read_text().splitlines()
    assert len(rows) == 3 and float(rows[1].split(",")[rows[0].split(",").index("prob_pneumonia")]) == pytest.approx(
        exported["probs"][0], abs=1e-4)


def test_predict_files_onnx(exported, tmp_path):
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\0" * 10)
    preds = predict_files_onnx(exported["onnx"], [*FILES[:4], bad], batch_size=3)
    assert [p.path for p in preds] == [str(f) for f in FILES[:4]] + [str(bad)]
    for p, expected in zip(preds[:4], exported["probs"][:4], strict=True):
        assert p.prob_pneumonia == pytest.approx(expected, abs=1e-4)
        assert p.label == ("PNEUMONIA" if p.prob_pneumonia >= THRESHOLD else "NORMAL")
    assert preds[4].error and "broken.jpeg" in preds[4].error and preds[4].label is None
    # An explicit threshold overrides the file's (both ways: every image at or above the file's own was PNEUMONIA at
    # 0.0 whatever the threshold used, so that check alone could not fail).
    assert {p.label for p in predict_files_onnx(exported["onnx"], FILES[:4], threshold=0.0)} == {"PNEUMONIA"}
    assert {p.label for p in predict_files_onnx(exported["onnx"], FILES[:4], threshold=1.0)} == {"NORMAL"}


def test_an_onnx_model_of_a_draft_model_decodes_in_draft_mode(exported, tmp_path):
    # The contract carries the model's JPEG decoding: predict and the service on ONNX Runtime decode as it was trained.
    from PIL import Image

    from cxr.serve import OnnxEngine, run_prediction

    proto = onnx.load(exported["onnx"])
    entry = next(p for p in proto.metadata_props if p.key == CONTRACT_KEY)
    contract = json.loads(entry.value)
    assert contract["draft"] is False
    entry.value = json.dumps({**contract, "draft": True})
    onnx.save(proto, tmp_path / "draft.onnx")
    big = tmp_path / "big.jpeg"
    Image.fromarray(load_image(FILES[-1], 512)).save(big, quality=95)
    predictor = OnnxPredictor(tmp_path / "draft.onnx")
    expected = predictor.predict_uint8(load_image(big, SIZE, draft=True)[None])[0]
    assert abs(expected - predictor.predict_uint8(load_image(big, SIZE)[None])[0]) > 1e-7
    assert predict_files_onnx(tmp_path / "draft.onnx", [big])[0].prob_pneumonia == pytest.approx(expected, abs=1e-9)
    served = run_prediction(OnnxEngine(tmp_path / "draft.onnx"), big.read_bytes(), "big.jpeg", heatmap=False)
    assert served["probability"] == pytest.approx(expected, abs=1e-9)
    entry.value = json.dumps({**contract, "draft": "yes"})  # edited by hand: refused in one line
    onnx.save(proto, tmp_path / "odd.onnx")
    with pytest.raises(CheckpointError, match="draft 'yes'"):
        OnnxPredictor(tmp_path / "odd.onnx")
    # An export of a cxr whose contract did not name the decoding yet: not draft mode, the default
    entry.value = json.dumps({k: v for k, v in contract.items() if k != "draft"})
    onnx.save(proto, tmp_path / "older.onnx")
    assert OnnxPredictor(tmp_path / "older.onnx").draft is False


def test_onnx_backend_in_the_service(exported):
    from fastapi.testclient import TestClient

    from cxr.serve import create_app

    client = TestClient(create_app(exported["onnx"], backend="onnx"))
    f = FILES[-1]
    r = client.post("/api/v1/predict", files={"file": (f.name, f.read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["probability"] == pytest.approx(exported["probs"][-1], abs=1e-4)
    assert body["model"]["backend"] == "onnx" and body["model"]["id"] == exported["id"]
    assert body["threshold"] == pytest.approx(THRESHOLD)
    assert body["heatmap"] is None and "ONNX Runtime" in body["heatmap_note"]
    card = client.get("/api/v1/model").json()
    assert card["backend"] == "onnx" and card["threshold"] == pytest.approx(THRESHOLD)
    assert client.post("/api/v1/predict", files={"file": ("x.txt", b"text")}).status_code == 415


def test_the_service_on_an_onnx_file_runs_without_torch(exported):
    # As `cxr predict` above: `cxr serve --backend onnx` on an exported file starts and answers with torch unimportable.
    import subprocess
    import sys

    code = ("import sys, json; sys.modules['torch'] = None\n"
            "from fastapi.testclient import TestClient\n"
            "from cxr.serve import create_app\n"
            f"client = TestClient(create_app({str(exported['onnx'])!r}, backend='onnx'))\n"
            f"r = client.post('/api/v1/predict', files={{'file': ('x.jpeg', open({str(FILES[0])!r}, 'rb').read())}})\n"
            "print(json.dumps([r.status_code, r.json(), client.get('/').status_code]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, body, page = json.loads(proc.stdout.splitlines()[-1])
    assert status == 200 and page == 200, body
    assert body["probability"] == pytest.approx(exported["probs"][0], abs=1e-4) and body["heatmap"] is None


@pytest.fixture
def counted_exports(exported, monkeypatch):
    """``onnx_model_bytes`` replaced by one that counts its calls and hands back the bytes already exported (the
    export itself is what the other tests check, and takes seconds)."""
    import cxr.export

    seen = []

    def export(ckpt):
        seen.append(ckpt.path)
        return exported["onnx"].read_bytes()

    monkeypatch.setattr(cxr.export, "onnx_model_bytes", export)
    return seen


def test_a_checkpoint_is_exported_for_onnx_runtime_once(exported, counted_exports, tmp_path, caplog):
    # `cxr predict|serve --backend onnx --model CKPT` exports on the first start and reads the cache after.
    first = load_onnx_predictor(exported["ckpt"])
    assert counted_exports == [str(exported["ckpt"])]
    cached = list((Path(os.environ["CXR_CACHE_DIR"]) / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == exported["onnx"].read_bytes()
    again = load_onnx_predictor(exported["ckpt"])
    assert counted_exports == [str(exported["ckpt"])], "the second start exported again"
    for predictor in (first, again):
        assert predictor.model_id == exported["id"]
        assert np.abs(predictor.predict_uint8(exported["images"][:4]) - exported["probs"][:4]).max() < 1e-4

    # Another threshold is another contract, so another export (a cached file would carry the old one).
    ckpt = load_checkpoint(exported["ckpt"])
    other = tmp_path / "other.pt"
    save_checkpoint(Checkpoint(ckpt.arch, ckpt.state_dict, ckpt.config, threshold=0.7), other)
    load_onnx_predictor(other)
    assert counted_exports == [str(exported["ckpt"]), str(other)]
    assert len(list(cached[0].parent.glob("*.onnx"))) == 2

    # A damaged cache file is exported again, with a warning, and replaced: one that no longer parses, and one whose
    # weights changed and that still parses (it had given other probabilities without a word).
    for damage in ("unreadable", "weights"):
        data = bytearray(cached[0].read_bytes())
        if damage == "unreadable":
            data = bytearray(b"not an onnx model")
        else:
            data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
        cached[0].write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cxr"):
            fixed = load_onnx_predictor(exported["ckpt"])
        assert counted_exports[-1] == str(exported["ckpt"]), damage
        assert "damaged (its bytes are not the ones written)" in caplog.text and fixed.model_id == exported["id"]
        assert np.abs(fixed.predict_uint8(exported["images"][:4]) - exported["probs"][:4]).max() < 1e-4
        key = cached[0].name.rsplit("-", 1)[0]
        (cached[0],) = cached[0].parent.glob(f"{key}-*.onnx")  # the new export, in place of the damaged one
        assert cached[0].read_bytes() == exported["onnx"].read_bytes()
    assert len(counted_exports) == 4


def test_an_unwritable_onnx_cache_costs_time_not_results(exported, counted_exports, tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("CXR_CACHE_DIR", str(blocked))
    with caplog.at_level(logging.WARNING, logger="cxr"):
        predictor = load_onnx_predictor(exported["ckpt"])
        load_onnx_predictor(exported["ckpt"])
    assert counted_exports == [str(exported["ckpt"])] * 2
    assert "could not keep the ONNX export" in caplog.text
    assert np.abs(predictor.predict_uint8(exported["images"][:2]) - exported["probs"][:2]).max() < 1e-4


def test_an_export_onnx_runtime_refuses_is_said_in_one_line_without_a_cache(exported, monkeypatch):
    # With no cache file to blame (an unwritable cache), the export's own refusal is the error: the retry for a
    # cached file had met None there (AttributeError).
    import cxr.export

    monkeypatch.setattr(cxr.export, "cached_onnx_model_bytes", lambda ckpt: (b"not an onnx model", None))
    with pytest.raises(CheckpointError, match=f"{exported['ckpt']}: not a readable ONNX model"):
        load_onnx_predictor(exported["ckpt"])


def test_the_onnx_predictor_runs_on_the_threads_it_is_given(exported):
    # serve shares the cores among its predictions through this count (BENCHMARKS.md); it had been untested.
    for threads in (1, 3):
        assert OnnxPredictor(exported["onnx"], threads=threads).session.get_session_options().intra_op_num_threads \
            == threads


def test_the_onnx_cache_keeps_the_newest_exports(exported, counted_exports, tmp_path, monkeypatch):
    import cxr.export

    monkeypatch.setattr(cxr.export, "ONNX_CACHE_KEEP", 2)
    ckpt = load_checkpoint(exported["ckpt"])
    for i in range(4):
        path = tmp_path / f"t{i}.pt"
        save_checkpoint(Checkpoint(ckpt.arch, ckpt.state_dict, ckpt.config, threshold=0.1 + i / 10), path)
        cxr.export.cached_onnx_model_bytes(path)
        folder = Path(os.environ["CXR_CACHE_DIR"]) / "onnx"
        assert len(list(folder.glob("*.onnx"))) == min(i + 1, 2)
    assert len(counted_exports) == 4
    data, hit = cxr.export.cached_onnx_model_bytes(tmp_path / "t3.pt")
    assert hit is not None and len(counted_exports) == 4, "the newest export was pruned"
    # Kept by use, not by when written: t2, read again, outlives t3 when a fifth export prunes (a cache in use by
    # one model had lost it to every other model exported once since)
    assert cxr.export.cached_onnx_model_bytes(tmp_path / "t2.pt")[1] is not None and len(counted_exports) == 4
    save_checkpoint(Checkpoint(ckpt.arch, ckpt.state_dict, ckpt.config, threshold=0.9), tmp_path / "t4.pt")
    cxr.export.cached_onnx_model_bytes(tmp_path / "t4.pt")
    assert cxr.export.cached_onnx_model_bytes(tmp_path / "t2.pt")[1] is not None and len(counted_exports) == 5
    assert cxr.export.cached_onnx_model_bytes(tmp_path / "t3.pt")[1] is None and len(counted_exports) == 6


def test_bad_inputs_are_refused(exported, tmp_path):
    with pytest.raises(UsageError, match="no such ONNX file"):
        OnnxPredictor(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        OnnxPredictor(garbage)
    # A valid ONNX model, but not one of ours: no contract, so no way to prepare its input.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    foreign = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                                            "g", [x], [y]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(CheckpointError, match="without a cxr contract"):
        OnnxPredictor(tmp_path / "foreign.onnx")
    # Ours, with its contract edited by hand: one line when loaded, not a traceback at the first prediction.
    for edit in ({"max_pixels": None}, {"max_pixels": 0}, {"max_pixels": -1}, {"image_size": SIZE + 8},
                 {"threshold": 7}, {"threshold": -0.1}):
        model = onnx.load(exported["onnx"])
        prop = next(p for p in model.metadata_props if p.key == CONTRACT_KEY)
        prop.value = json.dumps({**json.loads(prop.value), **edit})
        onnx.save(model, tmp_path / "edited.onnx")
        with pytest.raises(CheckpointError, match="edited.onnx: its cxr contract does not fit the model"):
            OnnxPredictor(tmp_path / "edited.onnx")
    for edit in ({"threshold": 0}, {"threshold": 1}):  # the ends of the range are thresholds, as --threshold takes them
        model = onnx.load(exported["onnx"])
        prop = next(p for p in model.metadata_props if p.key == CONTRACT_KEY)
        prop.value = json.dumps({**json.loads(prop.value), **edit})
        onnx.save(model, tmp_path / "edge.onnx")
        assert OnnxPredictor(tmp_path / "edge.onnx").threshold == edit["threshold"]
    # A graph that takes floats, or gives probabilities of one class or three: refused when loaded (it failed at the
    # first prediction with a traceback, or labelled every image alike).
    contract_text = next(p for p in onnx.load(exported["onnx"]).metadata_props if p.key == CONTRACT_KEY).value
    three_names = json.dumps({**json.loads(contract_text), "class_names": ["NORMAL", "VIRAL", "BACTERIAL"]})
    for dtype, width, contract in ((onnx.TensorProto.FLOAT, 2, contract_text), (onnx.TensorProto.UINT8, 1,
                                   contract_text), (onnx.TensorProto.UINT8, 3, contract_text),
                                   (onnx.TensorProto.UINT8, 3, three_names)):  # three classes, both sides agreeing
        image = onnx.helper.make_tensor_value_info("image", dtype, ["N", 1, SIZE, SIZE])
        probs = onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, width])
        const = onnx.helper.make_node("Constant", [], ["probabilities"], value=onnx.helper.make_tensor(
            "p", onnx.TensorProto.FLOAT, [1, width], [1.0 / width] * width))
        odd = onnx.helper.make_model(onnx.helper.make_graph([const], "g", [image], [probs]),
                                     opset_imports=[onnx.helper.make_opsetid("", 18)])
        entry = odd.metadata_props.add()
        entry.key, entry.value = CONTRACT_KEY, contract
        onnx.save(odd, tmp_path / "odd.onnx")
        with pytest.raises(CheckpointError, match="odd.onnx: its cxr contract does not fit the model"):
            OnnxPredictor(tmp_path / "odd.onnx")
    # A contract of a later layout than this cxr reads is refused, not half-understood.
    model = onnx.load(exported["onnx"])
    prop = next(p for p in model.metadata_props if p.key == CONTRACT_KEY)
    prop.value = json.dumps({**json.loads(prop.value), "contract_version": 2})
    onnx.save(model, tmp_path / "newer.onnx")
    with pytest.raises(CheckpointError, match=r"newer.onnx: exported by a newer cxr \(contract 2, this cxr reads up"):
        OnnxPredictor(tmp_path / "newer.onnx")
    with pytest.raises(UsageError, match="format"):
        export_model(exported["ckpt"], "tflite", tmp_path / "m.tflite")
    with pytest.raises(UsageError, match="directory"):
        export_model(exported["ckpt"], "onnx", tmp_path)
    with pytest.raises(UsageError, match="uint8"):
        OnnxPredictor(exported["onnx"]).predict_uint8(np.zeros((2, SIZE, SIZE), np.float32))
    with pytest.raises(UsageError, match="batch_size must be a whole number >= 1, got 0"):  # range()'s ValueError
        OnnxPredictor(exported["onnx"]).predict_uint8(exported["images"][:2], batch_size=0)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_images_as_a_list_or_a_flipped_view_are_predicted_as_an_array(exported):
    # A list had failed inside the input check (AttributeError), a flipped view in torch (negative strides)
    from cxr.evaluate import load_for_inference

    run = load_for_inference(exported["ckpt"], device="cpu", amp="off")
    images = exported["images"][:3]
    flipped = images[:, ::-1]
    np.testing.assert_array_equal(run.probs(list(images)), run.probs(images))
    np.testing.assert_array_equal(run.probs(flipped), run.probs(np.ascontiguousarray(flipped)))
    np.testing.assert_array_equal(OnnxPredictor(exported["onnx"]).predict_uint8(list(images)),
                                  OnnxPredictor(exported["onnx"]).predict_uint8(images))
    with pytest.raises(UsageError, match="one size"):  # images of two sizes: NumPy's ValueError before
        run.probs([images[0], images[0][:8, :8]])


def test_a_model_file_of_another_kind_is_named_for_what_it_is(exported, tmp_path, capsys):
    # `cxr predict --model model.onnx` runs on ONNX Runtime without --backend; the commands that need a checkpoint
    # say what the file is instead of "possibly code", which torch's message for any non-pickle used to trigger.
    from cxr.cli import main as cxr_main

    image = str(FILES[0])
    assert cxr_main(["predict", "--model", str(exported["onnx"]), image, "--output", str(tmp_path / "p.csv")]) == 0
    assert float((tmp_path / "p.csv").read_text().splitlines()[1].split(",")[1]) == pytest.approx(
        exported["probs"][0], abs=1e-4)
    capsys.readouterr()
    torchscript = export_model(tiny_checkpoint(tmp_path / "r.pt", "resnet18"), "torchscript", tmp_path / "m.pt")
    for model, says in ((exported["onnx"], "an ONNX file"), (torchscript, "a TorchScript file"),
                        (FILES[0], "damaged, or not a torch file")):
        with pytest.raises(CheckpointError, match=says):
            load_checkpoint(model)
        assert cxr_main(["explain", "--model", str(model), image, "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "possibly code" not in err, err
    # A plain pickle of another protocol: torch warned of it in two lines before cxr's one.
    import pickle
    import warnings

    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not a cxr checkpoint"):
            load_checkpoint(tmp_path / "pickled.pt")
    assert not seen, [str(w.message) for w in seen]


@pytest.mark.parametrize("change", ["arch", "missing tensor", "classes"])
def test_weights_that_do_not_fit_the_architecture_give_one_line(exported, tmp_path, capsys, change):
    # torch's strict load lists every key: a 40 KB traceback for a checkpoint edited by hand or damaged.
    import dataclasses

    from cxr.cli import main as cxr_main

    ckpt = load_checkpoint(exported["ckpt"])
    if change == "arch":
        ckpt = dataclasses.replace(ckpt, arch="resnet18")
    elif change == "missing tensor":
        ckpt = dataclasses.replace(ckpt, state_dict={k: v for k, v in list(ckpt.state_dict.items())[1:]})
    else:
        ckpt = dataclasses.replace(ckpt, class_names=["A", "B", "C"])
    save_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "bad.pt").build()
    assert cxr_main(["predict", "--model", str(tmp_path / "bad.pt"), str(FILES[0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.pt: its weights do not fit" in err, err


def test_ctrl_c_during_the_onnx_export_is_an_interrupt(exported, tmp_path, monkeypatch, capsys):
    # torch's exporter wraps a KeyboardInterrupt in its own TorchExportError; the CLI must still say "interrupted"
    # (exit 130), not print the exporter's traceback. Its error type is stood in for by a RuntimeError.
    from cxr.cli import main

    def interrupted_export(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to export the model with torch.export") from e

    monkeypatch.setattr(torch.onnx, "export", interrupted_export)
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(exported["ckpt"]), "--format", "onnx", "--output", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["cxr export: interrupted"]
    assert not out.exists()


def test_an_onnx_export_that_fails_says_why_in_one_line(exported, tmp_path, monkeypatch, capsys):
    # On a read-only file system the exporter failed ("No usable temporary directory"), and `cxr serve --backend onnx`
    # ended in 122 lines of its traceback asking for a PyTorch issue. Its error type is stood in for by a RuntimeError.
    from cxr.cli import main

    def failed_export(*args, **kwargs):
        try:
            raise FileNotFoundError("No usable temporary directory found in ['/tmp', '/var/tmp']")
        except FileNotFoundError as e:
            raise RuntimeError("Failed to export the model with torch.export. Create an issue") from e

    monkeypatch.setattr(torch.onnx, "export", failed_export)
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(exported["ckpt"]), "--format", "onnx", "--output", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the ONNX export failed (FileNotFoundError: No usable temporary directory" in line
    assert "Traceback" not in line
    assert not out.exists()


def test_an_onnx_file_needs_its_suffix_and_runs_on_onnx_runtime(exported, tmp_path, capsys):
    from cxr.cli import main

    # Exported under another name, it would later pass for a checkpoint ("not a cxr checkpoint").
    assert main(["export", "--model", str(exported["ckpt"]), "--format", "onnx", "--output",
                 str(tmp_path / "m.txt")]) == 2
    assert "name an ONNX file *.onnx" in capsys.readouterr().err and not (tmp_path / "m.txt").exists()
    assert main(["predict", "--model", str(exported["onnx"]), "--backend", "torch", str(FILES[0])]) == 2
    assert "drop --backend torch" in capsys.readouterr().err
    assert main(["export", "--model", str(exported["ckpt"]), "--format", "torchscript", "--output",
                 str(tmp_path / "m.onnx")]) == 2
    assert "only an ONNX file" in capsys.readouterr().err
    # Neither kind of export can start a training run.
    ts = export_model(load_checkpoint(exported["ckpt"]), "torchscript", tmp_path / "m.pt")
    for path, kind in ((exported["onnx"], "an ONNX file"), (ts, "a TorchScript file")):
        with pytest.raises(CheckpointError, match=f"{kind}, which cannot be trained on"):
            build_model("densenet121", str(path))


def test_the_bundled_model_card_belongs_to_the_bundled_model():
    # /api/v1/model and the ONNX contract show these validation figures; they must be of this very file.
    from cxr.export import model_card

    ckpt = load_checkpoint("default")
    card = model_card(ckpt)
    val = card["metrics"]["val"]
    assert val["threshold"] == pytest.approx(ckpt.threshold, abs=1e-12) and val["n"] == 748
    assert 0 < val["ci95"]["accuracy"][0] <= val["accuracy"] <= val["ci95"]["accuracy"][1] <= 1
    counts = card["training_data"]["counts"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 5232  # Kermany train + val
    # Intervals by cxr's current method, as MODEL_CARD.md gives them: the service and every ONNX export had shown
    # session 11's percentile bootstrap of the images after the method changed (session 20).
    from cxr.evaluate import CI_METHOD_PATIENTS

    assert val["ci95_method"] == CI_METHOD_PATIENTS and val["n_patients"] == 409
    assert [round(x, 3) for x in val["ci95"]["specificity"]] == [0.978, 1.0]
    assert [round(x, 4) for x in val["ci95"]["auroc"]] == [0.9989, 0.9999]
    # The service's page shows the limitations: the first had said "the data set named under training_data".
    assert card["limitations"][0].startswith("Trained on the data set kermany-224; ")
    assert not any("{" in text or "training_data" in text for text in card["limitations"])
    unnamed = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, data=""), extra={}, path=None)
    assert model_card(unnamed)["limitations"][0].startswith("Trained on a data set it does not name; ")


def test_export_model_itself_refuses_a_suffix_of_the_other_format(exported, tmp_path):
    # The check was the CLI's only: from Python, a TorchScript file named *.onnx went to ONNX Runtime later.
    for fmt, name in (("torchscript", "ts.onnx"), ("torchscript", "TS.ONNX"), ("onnx", "model.pt")):  # any case:
        # predict and serve take MODEL.ONNX for ONNX as well
        with pytest.raises(UsageError, match=r"name an ONNX file \*\.onnx"):
            export_model(exported["ckpt"], fmt, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_an_export_cut_short_leaves_the_file_it_was_replacing(exported, tmp_path, monkeypatch):
    # A disk that fills during `cxr export --output model.onnx` must leave the model.onnx a service loads as it was:
    # written in place, a half file took its name.
    import errno

    import cxr.export

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the model in service")
    monkeypatch.setattr(cxr.export, "onnx_model_bytes", lambda ckpt: bytes(1000))

    def disk_full(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(exported["ckpt"], "onnx", out)
    assert out.read_bytes() == b"the model in service" and [f.name for f in tmp_path.iterdir()] == ["model.onnx"]


def test_an_export_of_a_run_whose_threshold_was_never_chosen_warns_and_so_do_its_users(tmp_path, caplog):
    # The torch path warned of a run's placeholder 0.5 (stopped before its end); cxr export, predict --backend onnx
    # and serve --backend onnx used it without a word, and the exported file carried it on as if chosen.
    from cxr.export import predict_files_onnx

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("arch: resnet18\n")
    tiny_checkpoint(run / "best.pt", "resnet18")
    said = "never chosen on validation"
    with caplog.at_level(logging.WARNING, logger="cxr"):
        out = export_model(run, "onnx", tmp_path / "m.onnx")
        assert said in caplog.text and "--threshold" not in caplog.text  # export has no --threshold to advise
        caplog.clear()
        OnnxPredictor(out)
        assert f"{out}: exported from a run's checkpoint (best.pt of a run that had not ended, or last.pt) whose " \
            f"decision threshold was {said}" in caplog.text and "give --threshold" in caplog.text
        caplog.clear()
        from cxr.serve import load_engine

        for backend, model in (("onnx", out), ("torch", run)):  # nor has serve
            load_engine(model, backend=backend, device="cpu")
            assert said in caplog.text and "--threshold" not in caplog.text, backend
            caplog.clear()
        OnnxPredictor(out, warn_threshold=False)
        predict_files_onnx(run, FILES[:1], threshold=0.3)  # a threshold given: nothing to warn of
        assert said not in caplog.text
        predict_files_onnx(run, FILES[:1])
        assert said in caplog.text
    caplog.clear()
    other = tmp_path / "other.pt"  # the same checkpoint, not a run's best.pt: its threshold is its own, no warning
    other.write_bytes((run / "best.pt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="cxr"):
        OnnxPredictor(export_model(other, "onnx", tmp_path / "other.onnx"))
    assert said not in caplog.text


def test_an_export_leaves_torchs_random_numbers_alone(exported, tmp_path):
    # Its example input was drawn from torch's global generator: a seeded script's later numbers changed with an export
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    export_model(exported["ckpt"], "torchscript", tmp_path / "m.ts")
    assert torch.equal(torch.rand(3), expected)


def test_an_onnx_export_from_python_keeps_the_exporters_chatter_out_of_the_users_log(tmp_path, caplog):
    # onnxscript and onnx_ir logged a dozen INFO lines an export ("Removed 1091 unused nodes") into a script's log
    import logging

    tiny_checkpoint(tmp_path / "r.pt", "resnet18")
    with caplog.at_level(logging.INFO):
        export_model(tmp_path / "r.pt", "onnx", tmp_path / "r.onnx")
    assert not [r.name for r in caplog.records if not r.name.startswith("cxr")], caplog.text
    assert [logging.getLogger(n).level for n in ("onnxscript", "onnx_ir")] == [logging.NOTSET] * 2  # as they were


def test_a_files_hash_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    # One command names one model several times (its id, the bundled model's, a fine-tune's start): hashed once. A
    # file rewritten in place, same size, is hashed again.
    import hashlib

    from cxr.export import file_sha256

    path = tmp_path / "m.pt"
    path.write_bytes(b"a" * 1000)
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert file_sha256(path) == file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert opened.count(str(path)) == 1
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    assert file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_model_card_json_beside_a_runs_best_pt_cannot_change_what_the_checkpoint_decides(tmp_path):
    # model_card.json adds what a person writes (intended use, notes); had its threshold or model_id been taken, the
    # service would show one threshold and decide by another, under the name of a model it is not.
    from cxr.export import model_card, model_id

    run = tmp_path / "run"
    run.mkdir()
    tiny_checkpoint(run / "best.pt", "resnet18")
    (run / "model_card.json").write_text(json.dumps({"threshold": 0.9, "model_id": "x", "class_names": ["A", "B"],
                                                     "intended_use": "teaching only"}))
    ckpt = load_checkpoint(run / "best.pt")
    card = model_card(ckpt)
    assert (card["threshold"], card["model_id"], card["class_names"]) == (THRESHOLD, model_id(ckpt),
                                                                           ["NORMAL", "PNEUMONIA"])
    assert card["intended_use"] == "teaching only"


def test_a_runs_model_card_has_its_metrics_only_when_taken_at_the_checkpoints_threshold(tmp_path):
    # metrics.json beside a run's best.pt gives the card its figures, those the card keeps, when they were computed at
    # the checkpoint's threshold; at another (a re-evaluation with --threshold) they are not this model's decisions.
    from cxr.export import model_card

    run = tmp_path / "run"
    run.mkdir()
    tiny_checkpoint(run / "best.pt", "resnet18")
    ckpt = load_checkpoint(run / "best.pt")
    (run / "summary.json").write_text(json.dumps({"counts": {"train": {"NORMAL": 3}}}))
    for threshold, metrics in ((THRESHOLD, {"val": {"threshold": THRESHOLD, "auroc": 0.9, "n": 8}}), (0.5, None)):
        (run / "metrics.json").write_text(json.dumps({"val": {"threshold": threshold, "auroc": 0.9, "n": 8,
                                                              "confusion": [[1, 2], [3, 4]]}}))
        card = model_card(ckpt)
        assert card["metrics"] == metrics and card["training_data"]["counts"] == {"train": {"NORMAL": 3}}


def test_a_cached_onnx_export_that_onnx_runtime_refuses_is_exported_again(exported, counted_exports, caplog):
    # A cached file whose bytes are the ones written (its digest holds) but whose contract cxr refuses (edited, or a
    # cache shared with another cxr) had stopped every `--backend onnx` start until the cache was cleared by hand.
    load_onnx_predictor(exported["ckpt"])
    (cached,) = (Path(os.environ["CXR_CACHE_DIR"]) / "onnx").glob("*.onnx")
    proto = onnx.load(str(cached))
    entry = next(p for p in proto.metadata_props if p.key == CONTRACT_KEY)
    entry.value = json.dumps({**json.loads(entry.value), "draft": "yes"})
    data = proto.SerializeToString()
    cached.unlink()
    refused = cached.with_name(f"{cached.name.rsplit('-', 1)[0]}-{hashlib.sha256(data).hexdigest()[:16]}.onnx")
    refused.write_bytes(data)
    with pytest.raises(CheckpointError, match="draft 'yes'"):
        OnnxPredictor(refused)
    with caplog.at_level(logging.WARNING, logger="cxr"):
        again = load_onnx_predictor(exported["ckpt"])
    assert f"the cached ONNX export {refused} is unusable (" in caplog.text
    assert f"draft 'yes'): damaged or edited by hand; export it again with cxr export): exporting {exported['ckpt']} " \
        "again" in caplog.text
    assert counted_exports == [str(exported["ckpt"])] * 2 and not refused.exists()
    assert np.abs(again.predict_uint8(exported["images"][:4]) - exported["probs"][:4]).max() < 1e-4


def test_a_checkpoint_loaded_by_a_relative_path_still_names_its_file_after_a_chdir(exported, tmp_path, monkeypatch):
    # A notebook loads runs/x/best.pt, then changes folder: the Checkpoint's relative path had named no file, so its
    # model_id became a hash of the weights, and export over the checkpoint itself was no longer refused.
    from cxr.export import model_id

    monkeypatch.chdir(exported["ckpt"].parent)
    ckpt = load_checkpoint(exported["ckpt"].name)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert Path(ckpt.path) == exported["ckpt"] and model_id(ckpt) == exported["id"]
    before = exported["ckpt"].read_bytes()
    with pytest.raises(UsageError, match="input"):
        export_model(ckpt, "torchscript", exported["ckpt"])
    assert exported["ckpt"].read_bytes() == before


def test_files_already_listed_may_be_one_path(exported):
    # predict_files(..., listed=True) with one path had taken each of its characters for a file ("d: no such file").
    one = str(FILES[0])
    (torch_pred,) = predict_files(exported["ckpt"], one, device="cpu", listed=True)
    (onnx_pred,) = predict_files_onnx(exported["onnx"], Path(one), listed=True)
    assert torch_pred.path == onnx_pred.path == one and torch_pred.error is None is onnx_pred.error


def test_a_checkpoint_whose_weights_changed_in_memory_is_not_named_after_its_file(tmp_path):
    # A loaded checkpoint perturbed in place kept its file's model_id: its predictions were filed under another model.
    from cxr.export import model_id
    from cxr.model import load_checkpoint

    ckpt = load_checkpoint("default")
    from_file = model_id(ckpt)
    assert from_file == model_id(load_checkpoint("default")) and len(from_file) == 12
    name = next(iter(ckpt.state_dict))
    ckpt.state_dict[name].add_(1)  # in place
    changed = model_id(ckpt)
    assert changed != from_file
    ckpt.state_dict[name] = ckpt.state_dict[name].clone()  # replaced
    assert model_id(ckpt) == changed  # named by its weights, as a checkpoint never saved is
    # A copy with other weights (dataclasses.replace): the record of what was read goes with it (it had been dropped)
    import dataclasses

    fresh = load_checkpoint("default")
    other = {k: v * 1.3 if k == name else v for k, v in fresh.state_dict.items()}
    assert model_id(dataclasses.replace(fresh, state_dict=other)) != from_file
    assert model_id(dataclasses.replace(fresh, threshold=0.3)) == from_file  # the same weights: the file's name
    import pickle

    assert model_id(pickle.loads(pickle.dumps(fresh))) == from_file  # a copy in another process: its file's name
