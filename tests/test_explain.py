"""Grad-CAM sanity (size, range, dependence on the weights) and ``explain_files`` on real X-rays with a tiny model."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.config import load_config
from cxr.demo import SAMPLE_DIR
from cxr.errors import UsageError
from cxr.explain import DISCLAIMER, explain_files, grad_cam, heatmaps_for_images, overlay, target_layer
from cxr.images import load_image
from cxr.model import Checkpoint, build_model, normalize, save_checkpoint

SIZE = 96  # DenseNet-121's last block is 3x3 here: small, but a map with structure
FILES = sorted((SAMPLE_DIR / "test" / "NORMAL").glob("*.jpeg"))[:1] + \
    sorted((SAMPLE_DIR / "test" / "PNEUMONIA").glob("*.jpeg"))[:1]


@pytest.fixture(scope="module")
def xrays() -> torch.Tensor:
    images = np.stack([load_image(f, SIZE) for f in FILES])
    return normalize(torch.from_numpy(images)[:, None], 0.449, 0.226)


@pytest.fixture(scope="module")
def densenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("densenet121", "none").eval()


@pytest.fixture(scope="module")
def pneumonia_maps(densenet, xrays) -> tuple[np.ndarray, np.ndarray]:
    return grad_cam(densenet, xrays, 1)


def test_heatmap_has_the_input_size_and_is_scaled(densenet, xrays, pneumonia_maps):
    cam, logits = pneumonia_maps
    assert cam.shape == (len(FILES), SIZE, SIZE)
    assert logits.shape == (len(FILES), 2)
    assert np.isfinite(cam).all()
    assert cam.min() >= 0 and cam.max() <= 1
    # Each map peaks at 1 and is not flat: it says where, not just "everywhere".
    np.testing.assert_allclose(cam.reshape(len(FILES), -1).max(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cam.reshape(len(FILES), -1).min(axis=1), 0.0, atol=1e-6)
    assert (cam.std(axis=(1, 2)) > 0.05).all()
    # The logits are the model's own.
    with torch.no_grad():
        np.testing.assert_allclose(logits, densenet(xrays).numpy(), atol=1e-4)


def test_heatmap_changes_when_the_weights_are_randomised(densenet, xrays, pneumonia_maps):
    """A map that stayed the same would come from the image alone (an edge detector), not from the model."""
    before, _ = pneumonia_maps
    head = build_model("densenet121", "none")
    head.load_state_dict(densenet.state_dict())
    torch.manual_seed(123)
    head.classifier.reset_parameters()  # the top layer randomised, the features kept
    after_head, _ = grad_cam(head.eval(), xrays, 1)
    torch.manual_seed(456)
    fresh = build_model("densenet121", "none").eval()  # every weight randomised
    after_all, _ = grad_cam(fresh, xrays, 1)
    assert np.abs(before - after_head).mean() > 0.1
    assert np.abs(before - after_all).mean() > 0.1


def test_grad_cam_leaves_no_gradients_and_runs_under_inference_mode(densenet, xrays):
    with torch.inference_mode():
        cam, _ = grad_cam(densenet, xrays[:1])
    assert cam.shape == (1, SIZE, SIZE)
    assert all(p.grad is None for p in densenet.parameters())
    assert not densenet.training


def test_target_none_explains_the_argmax_and_classes_differ(densenet, xrays, pneumonia_maps):
    pneumonia, logits = pneumonia_maps
    normal, _ = grad_cam(densenet, xrays, 0)
    auto, _ = grad_cam(densenet, xrays)
    np.testing.assert_allclose(auto, np.where(logits.argmax(1)[:, None, None] == 1, pneumonia, normal), atol=1e-6)
    # Log-odds maps of the two classes are complementary, so they cannot be the same picture.
    assert np.abs(pneumonia - normal).mean() > 0.1


def test_resnet_uses_layer4():
    torch.manual_seed(0)
    model = build_model("resnet18", "none").eval()
    assert target_layer(model) is model.layer4
    maps, probs = heatmaps_for_images(model, np.stack([load_image(f, 64) for f in FILES]), mean=0.449, std=0.226,
                                      target=np.array([0, 1]), batch_size=1)
    assert maps.shape == (len(FILES), 64, 64) and probs.shape == (len(FILES),)
    assert ((probs > 0) & (probs < 1)).all()


def test_overlay_keeps_cold_pixels_grey_and_colours_hot_ones():
    image = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    cold = overlay(image, np.zeros((8, 8), np.float32))
    assert cold.shape == (32, 32, 3) and cold.dtype == np.uint8
    np.testing.assert_array_equal(cold, np.repeat(image[..., None], 3, axis=2))
    heat = np.zeros((32, 32), np.float32)
    heat[:, 16:] = 1.0
    hot = overlay(image, heat)
    assert (hot[:, :16] == cold[:, :16]).all()
    assert np.abs(hot[:, 20:].astype(int) - cold[:, 20:]).max() > 50
    assert overlay(image, None, size=48).shape == (48, 48, 3)


def test_explain_files_writes_one_picture_per_readable_image(tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model("resnet18", "none")
    cfg = load_config(overrides={"image_size": 64, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", model.state_dict(), cfg, threshold=0.5), tmp_path / "model.pt")
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = explain_files(tmp_path / "model.pt", [FILES[0], broken, FILES[1]], tmp_path / "out", device="cpu")
    assert [p.name for p in out] == [f"{FILES[0].stem}_gradcam.png", f"{FILES[1].stem}_gradcam.png"]
    for p in out:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 200
    rows = list(csv.DictReader((tmp_path / "out" / "explanations.csv").read_text().splitlines()))
    # Every file in input order; the unreadable one with its error, as in `cxr predict`'s file.
    assert [r["path"] for r in rows] == [str(FILES[0]), str(broken), str(FILES[1])]
    assert "broken.jpeg" in rows[1]["error"] and rows[1]["prob_pneumonia"] == rows[1]["output"] == ""
    assert {r["note"] for r in rows} == {DISCLAIMER}
    # Again into the same folder, with one file: the other's picture stays, and is said not to be listed.
    caplog.clear()
    explain_files(tmp_path / "model.pt", [FILES[1]], tmp_path / "out", device="cpu")
    assert f"1 picture(s) of an earlier run (e.g. {FILES[0].stem}_gradcam.png)" in caplog.text
    explain_files(tmp_path / "model.pt", [FILES[0], FILES[1]], tmp_path / "out", device="cpu")  # as the first run

    # A file given twice (a folder, then one of its files, say) is two rows, each in its place; before, both moved
    # to the later place: [a, b, a] came out as [b, a, a], in explain and in predict.
    from cxr.predict import predict_files

    again = explain_files(tmp_path / "model.pt", [FILES[0], FILES[1], FILES[0]], tmp_path / "again", device="cpu",
                          batch_size=2)
    assert len(again) == 3
    rows_again = list(csv.DictReader((tmp_path / "again" / "explanations.csv").read_text().splitlines()))
    assert [r["path"] for r in rows_again] == [str(FILES[0]), str(FILES[1]), str(FILES[0])]
    twice = predict_files(tmp_path / "model.pt", [FILES[0], broken, FILES[1], FILES[0]], device="cpu", batch_size=3)
    assert [p.path for p in twice] == [str(FILES[0]), str(broken), str(FILES[1]), str(FILES[0])]
    assert twice[0].prob_pneumonia == pytest.approx(twice[3].prob_pneumonia, abs=1e-5)

    # The same numbers `cxr predict` gives.

    preds = {p.path: p for p in predict_files(tmp_path / "model.pt", [FILES[0], FILES[1]], device="cpu")}
    for r in (rows[0], rows[2]):
        assert float(r["prob_pneumonia"]) == pytest.approx(preds[r["path"]].prob_pneumonia, abs=1e-5)
        assert r["predicted"] == preds[r["path"]].label and not r["error"]
        assert (r["threshold"], r["model_id"]) == ("0.5", preds[r["path"]].model_id)

    # Nothing readable: an error that names the file where each one is listed, not a silent empty result.
    from cxr.errors import DataError

    with pytest.raises(DataError, match="none of the 2 file"):  # named twice, listed twice
        explain_files(tmp_path / "model.pt", [broken, broken], tmp_path / "none", device="cpu")
    assert (tmp_path / "none" / "explanations.csv").read_text().count("broken.jpeg") == 4  # path and error, twice

    with pytest.raises(UsageError, match="no image files: no paths given"):  # "no image files in " and nothing
        explain_files(tmp_path / "model.pt", [], tmp_path / "none", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files in"):
        explain_files(tmp_path / "model.pt", [tmp_path / "empty"], tmp_path / "out-empty", device="cpu")
    assert not (tmp_path / "out-empty").exists()


def test_explain_amp_gives_the_probabilities_of_predict_amp(tmp_path, monkeypatch):
    # --amp as in `cxr predict`: on (bf16, emulated where the CPU lacks it) and off (fp32) each give predict's numbers
    # for the same setting, and differ from each other, so the setting is not ignored.
    from cxr.predict import predict_files

    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 64, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "model.pt")
    probs = {}
    for amp in ("on", "off"):
        explain_files(tmp_path / "model.pt", FILES[:2], tmp_path / amp, device="cpu", amp=amp)
        rows = list(csv.DictReader((tmp_path / amp / "explanations.csv").read_text().splitlines()))
        probs[amp] = np.array([float(r["prob_pneumonia"]) for r in rows])
        # said, as beside the report's fp32 figures they differ in their last digits, and nothing had said which
        assert {r["inference_dtype"] for r in rows} == {"bfloat16" if amp == "on" else "float32"}
        expected = [p.prob_pneumonia for p in predict_files(tmp_path / "model.pt", FILES[:2], device="cpu", amp=amp)]
        assert probs[amp] == pytest.approx(expected, abs=1e-6)
    assert np.abs(probs["on"] - probs["off"]).max() > 1e-5
    import cxr.explain

    shown, real = [], cxr.explain._explanation_figure
    monkeypatch.setattr(cxr.explain, "_explanation_figure", lambda *a, **k: (shown.append(k["title"]), real(*a, **k)))
    for amp in ("on", "off"):
        explain_files(tmp_path / "model.pt", FILES[:1], tmp_path / f"t{amp}", device="cpu", amp=amp)
    assert "(bf16)" in shown[0].splitlines()[1] and "(bf16)" not in shown[1]


def test_a_draft_model_is_given_draft_decoded_images_everywhere(tmp_path):
    # A model trained with draft: true (JPEGs decoded at 1/2..1/8 first) was evaluated so, but predict, explain, the
    # service and the report decoded its inputs in full: the same file got two probabilities.
    from cxr.export import contract
    from cxr.model import load_checkpoint
    from cxr.predict import predict_files
    from cxr.report import _PixelSource
    from cxr.serve import load_engine, run_prediction

    big = tmp_path / "big.jpeg"
    Image.fromarray(load_image(FILES[-1], 512)).save(big, quality=95)
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18", "draft": True})
    model = build_model("resnet18", "none").eval()
    save_checkpoint(Checkpoint("resnet18", model.state_dict(), cfg, threshold=0.5), tmp_path / "model.pt")
    drafted, full = load_image(big, 32, draft=True), load_image(big, 32)
    assert np.abs(drafted.astype(int) - full).max() > 0

    def prob(image):
        with torch.no_grad():
            x = normalize(torch.from_numpy(image)[None, None], cfg.mean, cfg.std)
            return torch.softmax(model(x).double(), 1)[0, 1].item()

    expected, other = prob(drafted), prob(full)
    assert abs(expected - other) > 1e-6
    assert predict_files(tmp_path / "model.pt", [big], device="cpu", amp="off")[0].prob_pneumonia == \
        pytest.approx(expected, abs=1e-6)
    explain_files(tmp_path / "model.pt", [big], tmp_path / "out", device="cpu", amp="off")
    row = next(csv.DictReader((tmp_path / "out" / "explanations.csv").read_text().splitlines()))
    assert float(row["prob_pneumonia"]) == pytest.approx(expected, abs=1e-6)
    engine = load_engine(tmp_path / "model.pt", device="cpu", amp="off")
    served = run_prediction(engine, big.read_bytes(), "big.jpeg", heatmap=False)["probability"]
    assert served == pytest.approx(expected, abs=1e-6)
    report_pixels = _PixelSource(32, draft=True).load(str(big))
    np.testing.assert_array_equal(report_pixels, drafted)
    assert contract(load_checkpoint(tmp_path / "model.pt"))["draft"] is True  # and so the ONNX backend's
    # One path, as a str or a Path, is one path (a str was taken as a list of its characters, and an absolute one
    # walked the file system from "/").
    for one in (str(big), big):
        assert [p.path for p in predict_files(tmp_path / "model.pt", one, device="cpu")] == [str(big)]
    assert len(explain_files(tmp_path / "model.pt", str(big), tmp_path / "one", device="cpu")) == 1


def test_a_uid_named_file_keeps_its_whole_name_and_a_flat_map_says_flat(tmp_path, monkeypatch):
    # Path.stem cut a UID's last part: a study's files all became 1.2.826.0.1.3680043.8.498_<n>_gradcam.png. And a flat
    # map's note ran past the picture's edges, "flat" cut off.
    import cxr.explain

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    uid = tmp_path / "1.2.826.0.1.3680043.8.498.1234"
    uid.write_bytes(FILES[0].read_bytes())
    odd = tmp_path / "a\nb.jpeg"  # a newline of a name is shown as \n, while the title keeps its own three lines
    odd.write_bytes(FILES[1].read_bytes())
    titles = []  # as drawn: the figure's title when it is saved
    from matplotlib.figure import Figure

    savefig = Figure.savefig
    monkeypatch.setattr(cxr.explain, "heatmaps_for_images",
                        lambda net, images, **kw: (np.zeros((len(images), 32, 32), np.float32),
                                                   np.full(len(images), 0.7)))  # its P is used in fp32
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: titles.append(fig._suptitle.get_text())
                        or savefig(fig, *a, **k))
    out = explain_files(tmp_path / "m.pt", [uid, FILES[1], odd], tmp_path / "out", device="cpu")
    assert [p.name for p in out] == ["1.2.826.0.1.3680043.8.498.1234_gradcam.png", f"{FILES[1].stem}_gradcam.png",
                                     "a\nb_gradcam.png"]
    assert titles[2].startswith("a\\nb.jpeg\npredicted ")
    assert all(t.count("\n") == 2 and t.splitlines()[-1].startswith("heatmap: flat, no region raised the score of")
               for t in titles), titles


def test_an_input_with_a_name_of_the_longest_length_gets_its_picture(tmp_path):
    # A 245-byte file name plus "_gradcam.png" (and the temporary name around it) could not be written: explain stopped
    # there ("File name too long") and wrote no explanations.csv for the others.
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    names = ["é" * 120 + ".jpeg", "é" * 120 + "x.jpeg", "L" * 250 + ".jpeg"]  # 245, 246 and 255 bytes
    for name in names:
        (tmp_path / name).write_bytes(FILES[0].read_bytes())
    out = explain_files(tmp_path / "m.pt", [tmp_path / n for n in names], tmp_path / "out", device="cpu")
    assert len({p.name for p in out}) == 3 and all(p.is_file() and len(os.fsencode(p.name)) <= 230 for p in out)
    assert all(p.name.endswith("_gradcam.png") for p in out)
    with open(tmp_path / "out" / "explanations.csv", newline="") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(str(tmp_path / n) for n in names)


def test_pictures_of_names_that_differ_only_in_case_are_two_files(tmp_path):
    # a/Scan.jpeg and b/scan.jpeg became Scan_gradcam.png and scan_gradcam.png: one file on macOS and Windows.
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    for folder, name in (("a", "Scan.jpeg"), ("b", "scan.jpeg")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(FILES[0].read_bytes())
    out = explain_files(tmp_path / "m.pt", [tmp_path / "a" / "Scan.jpeg", tmp_path / "b" / "scan.jpeg"],
                        tmp_path / "out", device="cpu")
    assert [p.name for p in out] == ["Scan_gradcam.png", "scan_2_gradcam.png"]


def test_explain_files_rejects_an_unknown_target(tmp_path):
    from cxr.errors import UsageError

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18").state_dict(), cfg), tmp_path / "m.pt")
    with pytest.raises(UsageError, match="target"):
        explain_files(tmp_path / "m.pt", [FILES[0]], tmp_path / "out", target="EFFUSION", device="cpu")


def test_library_calls_check_their_arguments_as_the_cli_does(tmp_path):
    # A threshold of NaN or 2 labelled everything alike (and evaluate ended in a JSON error), an amp typo ran fp32
    # without a word, batch_size 0 was range()'s ValueError, and the torch engine took a 64 px image for a 32 px model.
    from cxr.errors import UsageError
    from cxr.evaluate import evaluate_model
    from cxr.predict import predict_files
    from cxr.serve import load_engine

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg), tmp_path / "m.pt")
    # NumPy's numbers are numbers (they had been refused by the first version of the check).
    assert len(predict_files(tmp_path / "m.pt", FILES[:1], device="cpu", threshold=np.float32(0.5),
                             batch_size=np.int64(2))) == 1
    with pytest.raises(UsageError, match=r"no image files in .*empty$"):  # one path named whole, not letter by letter
        (tmp_path / "empty").mkdir()
        explain_files(tmp_path / "m.pt", str(tmp_path / "empty"), tmp_path / "x", device="cpu")
    for kwargs, said in (({"threshold": float("nan")}, "threshold"), ({"threshold": 2.0}, "threshold"),
                         ({"threshold": True}, "threshold"), ({"batch_size": True}, "batch_size"),
                         ({"amp": "bf16"}, "amp"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(UsageError, match=said):
            predict_files(tmp_path / "m.pt", FILES[:1], device="cpu", **kwargs)
        with pytest.raises(UsageError, match=said):
            explain_files(tmp_path / "m.pt", FILES[:1], tmp_path / "x", device="cpu", **kwargs)
        with pytest.raises(UsageError, match=said):
            evaluate_model(tmp_path / "m.pt", SAMPLE_DIR / "test", tmp_path / "ev", device="cpu", **kwargs)
    assert not (tmp_path / "ev" / "predictions_test.csv").exists()
    engine = load_engine(tmp_path / "m.pt", device="cpu")
    assert engine.predict_uint8(np.zeros((2, 32, 32), np.uint8)).shape == (2,)
    for bad in (np.zeros((2, 64, 64), np.uint8), np.zeros((2, 32, 32), np.float32), np.zeros((32, 32), np.uint8)):
        with pytest.raises(UsageError, match=r"expected uint8 grey images of shape \(N, 32, 32\)"):
            engine.predict_uint8(bad)


def test_the_array_functions_refuse_what_the_model_would_answer_wrongly(densenet):
    # A 0..1 float image (the usual notebook form) was divided by 255 again: a NORMAL X-ray read as black, P 0.99999.
    from cxr.errors import UsageError
    from cxr.evaluate import predict_logits

    images = np.stack([load_image(f, SIZE) for f in FILES])
    kw = {"mean": 0.449, "std": 0.226}
    for bad in (images.astype(np.float32) / 255, images[0], images[:, :, :SIZE // 2]):
        with pytest.raises(UsageError, match="expected uint8 grey images of shape"):
            predict_logits(densenet, bad, device=torch.device("cpu"), **kw)
        with pytest.raises(UsageError, match="expected uint8 grey images of shape"):
            heatmaps_for_images(densenet, bad, **kw)
    for target, says in ((5, "class index 0 or 1"), ("COVID", "not a class"), ([1], "one for each of 2"),
                         (True, "class index"), (0.5, "class index")):
        with pytest.raises(UsageError, match=says):
            heatmaps_for_images(densenet, images, target=target, **kw)
    with pytest.raises(UsageError, match="batch_size must be"):
        heatmaps_for_images(densenet, images, batch_size=0, **kw)
    # A class by name is the class by index.
    by_name = heatmaps_for_images(densenet, images, target="pneumonia", **kw)[0]
    np.testing.assert_array_equal(by_name, heatmaps_for_images(densenet, images, target=1, **kw)[0])
    np.testing.assert_array_equal(by_name, heatmaps_for_images(densenet, images, target=np.array(1), **kw)[0])


def test_a_loaded_checkpoint_is_a_model_for_the_library_functions(tmp_path):
    # A model trained in one's own loop had to be written to a file first (a TypeError for a Checkpoint).
    from cxr.evaluate import evaluate_model
    from cxr.model import load_checkpoint
    from cxr.predict import predict_files
    from cxr.serve import create_app

    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 64, "arch": "resnet18"})
    ckpt = Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5)
    assert load_checkpoint(ckpt) is ckpt
    save_checkpoint(ckpt, tmp_path / "m.pt")
    in_memory = [p.prob_pneumonia for p in predict_files(ckpt, FILES, device="cpu", amp="off")]
    assert in_memory == [p.prob_pneumonia for p in predict_files(tmp_path / "m.pt", FILES, device="cpu", amp="off")]
    assert len(explain_files(ckpt, FILES, tmp_path / "explained", device="cpu")) == len(FILES)
    metrics = evaluate_model(ckpt, SAMPLE_DIR / "test", tmp_path / "eval", device="cpu")
    assert metrics["test"]["n"] == 16
    assert metrics["test"]["model"] == "(a Checkpoint in memory)"  # not the current folder, which its path "" was
    assert create_app(ckpt, device="cpu").title


def test_an_interrupted_explain_lists_the_pictures_it_made(tmp_path, monkeypatch):
    # Ctrl-C after some pictures left them beside no explanations.csv, or beside an earlier run's describing others.
    import cxr.explain

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "explanations.csv").write_text("path\nsomething-else.jpeg\n")
    real, calls = cxr.explain._explanation_figure, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cxr.explain, "_explanation_figure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        explain_files(tmp_path / "m.pt", FILES[:3], out, device="cpu", batch_size=1)
    from pathlib import Path

    from .conftest import read_csv

    rows = read_csv(out / "explanations.csv")
    assert [r["path"] for r in rows] == [str(FILES[0])] and rows[0]["output"].endswith("_gradcam.png")
    assert sorted(p.name for p in out.glob("*_gradcam.png")) == [Path(rows[0]["output"]).name]


def test_predict_and_explain_take_any_iterable_of_paths_and_refuse_an_empty_output(tmp_path, monkeypatch):
    # Path.glob's generator lost the files the existence check consumed (7 results of 8); a NumPy array of paths met
    # NumPy's "truth value is ambiguous"; an empty output folder wrote into the current folder.
    from cxr.errors import UsageError
    from cxr.predict import predict_files

    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "model.pt")
    folder = SAMPLE_DIR / "test" / "NORMAL"
    every = sorted(folder.glob("*.jpeg"))
    for given in (folder.glob("*.jpeg"), (str(f) for f in every), np.array([str(f) for f in every])):
        assert sorted(p.path for p in predict_files(tmp_path / "model.pt", given, device="cpu")) == \
            sorted(map(str, every))
    missing_first = (p for p in [tmp_path / "gone.jpeg", *every[:2]])
    assert len(predict_files(tmp_path / "model.pt", missing_first, device="cpu")) == 3
    made = explain_files(tmp_path / "model.pt", (f for f in every[:2]), tmp_path / "out", device="cpu")
    assert len(made) == 2
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="empty"):
        explain_files(tmp_path / "model.pt", every[:1], "", device="cpu")
    with pytest.raises(UsageError, match="target"):
        explain_files(tmp_path / "model.pt", every[:1], tmp_path / "t", device="cpu", target=None)
    with pytest.raises(UsageError, match="a folder for the pictures and explanations.csv, not a file"):
        explain_files(tmp_path / "model.pt", every[:1], tmp_path / "x.png", device="cpu")  # had made a folder x.png
    assert not (tmp_path / "x.png").exists()
    assert not list(tmp_path.glob("*_gradcam.png")) and not (tmp_path / "explanations.csv").exists()


def test_names_in_pictures_keep_their_start_and_end_and_unknown_glyphs_are_escaped(tmp_path):
    # A 150-character name ran off both edges of explain's title; CJK characters were empty boxes (and a matplotlib
    # warning each), so that two Chinese names looked alike; the grid and the video kept a name's end only.
    import shutil
    import warnings

    from PIL import Image as PILImage
    from PIL import ImageDraw

    from cxr.fileio import shorten_middle
    from cxr.report import GridTile, plot_grid
    from cxr.video import _fit, _font, drawable

    assert drawable("胸部X線_Ünï.jpeg") == "\\u80f8\\u90e8X\\u7dda_Ünï.jpeg"
    assert shorten_middle("abcdefghij", 7) == "abc…hij" and shorten_middle("short", 7) == "short"
    draw = ImageDraw.Draw(PILImage.new("RGB", (10, 10)))
    fitted = _fit(draw, "start_" + "x" * 200 + "_end.jpeg", _font(12), 200)
    assert fitted.startswith("start_") and fitted.endswith("_end.jpeg") and "…" in fitted
    name = "胸部X線_" + "x" * 150 + "_end.jpeg"
    shutil.copy(FILES[0], tmp_path / name)
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "model.pt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        explain_files(tmp_path / "model.pt", [tmp_path / name], tmp_path / "out", device="cpu")
        fig = plot_grid({"right": [GridTile(np.zeros((32, 32), np.uint8), None, 1, 0.9, f"/d/{name}")]}, 0.5, "test")
    assert not [w for w in seen if "Glyph" in str(w.message)], [str(w.message) for w in seen]
    (label,) = [ax.get_xlabel() for sub in fig.subfigs for ax in sub.axes if ax.get_xlabel()]
    assert label.startswith("\\u80f8") and label.endswith("_end.jpeg") and len(label) == 30


def test_a_grid_of_one_cell_gives_a_uniform_map_not_its_rounding_noise(densenet, xrays):
    # At 32 px DenseNet's last block is 1x1: upsampled, its one value differed by ~2e-7 across the picture, and that
    # noise, stretched to [0, 1], was drawn as "evidence for PNEUMONIA".
    small = torch.nn.functional.interpolate(xrays, size=(32, 32), mode="bilinear")
    for target in (0, 1):
        cam, _ = grad_cam(densenet, small, target)
        for m in cam:
            assert set(np.unique(m).tolist()) <= {0.0, 1.0} and m.min() == m.max()
    cam, _ = grad_cam(densenet, xrays, 1)  # a grid with structure is still stretched to [0, 1]
    assert cam.reshape(len(cam), -1).max(axis=1).tolist() == [1.0] * len(cam) and (cam.std(axis=(1, 2)) > 0.05).all()


def test_the_caption_counts_the_cells_of_the_grid_the_model_has(densenet):
    # side // 32 said 5x5 for 190 px and 2x2 for 94 px: DenseNet's stem rounds up, to 6x6 and 3x3.
    from cxr.explain import grid_cells

    assert [grid_cells(densenet, s) for s in (32, 94, 96, 190, 224)] == [1, 3, 3, 6, 7]


def test_an_image_exactly_at_the_threshold_is_pneumonia_in_every_command(tmp_path, monkeypatch):
    # "PNEUMONIA when P >= threshold" had been pinned in evaluate alone: predict, the service, explain's pictures,
    # the report's operating point and error video, and the video's frames each had a rule of their own, any of
    # which could have turned to ">" unseen. A head of zeros gives equal logits: P exactly 0.5, at threshold 0.5.
    from fastapi.testclient import TestClient
    from PIL import ImageDraw

    from cxr.predict import predict_files
    from cxr.report import SplitPredictions, _operating_point, pick_video_indices
    from cxr.serve import create_app, load_engine
    from cxr.video import VideoItem, render_frame

    net = build_model("resnet18", "none")
    torch.nn.init.zeros_(net.fc.weight)
    torch.nn.init.zeros_(net.fc.bias)
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    model = tmp_path / "m.pt"
    save_checkpoint(Checkpoint("resnet18", net.state_dict(), cfg, threshold=0.5), model)
    preds = predict_files(model, FILES, device="cpu", amp="off")
    assert [(p.prob_pneumonia, p.label) for p in preds] == [(0.5, "PNEUMONIA")] * len(FILES)
    with TestClient(create_app(load_engine(model, "torch", "cpu", amp="off"))) as client:
        r = client.post("/api/v1/predict?heatmap=false", files={"file": ("x.jpeg", FILES[0].read_bytes())})
    assert (r.json()["probability"], r.json()["label"]) == (0.5, "PNEUMONIA"), r.text
    explain_files(model, FILES, tmp_path / "ex", device="cpu", amp="off")
    with open(tmp_path / "ex" / "explanations.csv", encoding="utf-8") as f:
        assert {row["predicted"] for row in csv.DictReader(f)} == {"PNEUMONIA"}
    at = np.array([0.5, 0.5])
    assert pick_video_indices(SplitPredictions("test", ["a", "b"], np.array([0, 0]), at), 0.5, "errors") == [0, 1]
    assert _operating_point(np.array([0, 1]), at, 0.5) == (1.0, 1.0, 0.5)
    drawn, real_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: drawn.append(text)
                        or real_text(self, xy, text, *a, **k))
    render_frame(VideoItem("a.png", 1, 0.5, np.zeros((64, 64), np.uint8), None), index=0, total=1, right=1, wrong=0,
                 threshold=0.5, history=[True])
    assert "✓ RIGHT" in drawn and drawn[drawn.index("predicted") + 1] == "PNEUMONIA"


def test_grad_cams_graph_starts_at_the_explained_block_and_gives_the_maps_of_the_whole_one(densenet, xrays):
    # The whole network's graph had been kept (the input and every parameter required gradients): 2.8 GB for 16
    # images at 224 px. Now nothing before the block is differentiated, the maps are those of the whole graph, and
    # the parameters' flags are as they were.
    saved = []  # the bytes autograd keeps for the backward pass

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cam, logits = grad_cam(densenet, xrays, 1)
    # the head's few tensors (about the block's output), not the network's 1,098 (1,300 times the input, at 96 px)
    assert sum(saved) < 2 * xrays.numel() * 4 and all(p.requires_grad for p in densenet.parameters())
    # The reference: the whole graph, from an input that requires gradients.
    captured = []
    hook = densenet.features.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        x = xrays.clone().requires_grad_(True)
        out = densenet(x)
        (grads,) = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), captured[-1])
    finally:
        hook.remove()
    ref = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * captured[-1]).sum(dim=1, keepdim=True)).detach()
    ref = torch.nn.functional.interpolate(ref, size=xrays.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    ref = (ref - ref.flatten(1).min(1).values[:, None, None]) / (
        ref.flatten(1).max(1).values - ref.flatten(1).min(1).values)[:, None, None]
    np.testing.assert_allclose(cam, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits, out.detach().numpy(), atol=1e-5)


def test_grad_cam_in_two_threads_on_one_model_leaves_its_parameters_as_they_were():
    # Each call switches the parameters' gradients off and back: interleaved, the "back" wrote False (0 of 62 left).
    import threading

    torch.manual_seed(0)
    net = build_model("resnet18", "none").eval()
    x = torch.randn(2, 1, 32, 32)
    maps = []
    threads = [threading.Thread(target=lambda: [maps.append(grad_cam(net, x, 1)[0]) for _ in range(10)])
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.requires_grad for p in net.parameters()) and len(maps) == 20
    assert all(np.array_equal(m, maps[0]) for m in maps)  # and no call saw the other's hook fire


def test_in_fp32_explain_predicts_and_explains_in_one_pass_at_the_models_threshold(tmp_path, monkeypatch):
    # The probabilities had taken a forward pass of their own before Grad-CAM's (in fp32 the same numbers): one pass
    # now gives both, and explains the class the threshold gives, not the larger logit's.
    import cxr.evaluate
    from cxr.predict import predict_files

    torch.manual_seed(0)
    net = build_model("resnet18", "none").eval()
    images = np.stack([load_image(f, 64) for f in FILES])
    kw = {"mean": 0.449, "std": 0.226, "batch_size": 8}
    _, probs = heatmaps_for_images(net, images, **kw)
    cut = float(np.sort(probs)[len(probs) // 2])  # half the images on each side
    maps, same = heatmaps_for_images(net, images, threshold=cut, **kw)
    np.testing.assert_array_equal(same, probs)
    np.testing.assert_array_equal(maps, heatmaps_for_images(net, images, target=(probs >= cut).astype(int), **kw)[0])
    assert not np.array_equal(maps, heatmaps_for_images(net, images, target=(probs >= 0.5).astype(int), **kw)[0])
    with pytest.raises(UsageError, match="threshold"):
        heatmaps_for_images(net, images, threshold=1.5, **kw)
    np.testing.assert_array_equal(heatmaps_for_images(net, images, threshold=np.float32(cut), **kw)[1], probs)

    cfg = load_config(overrides={"image_size": 64, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", net.state_dict(), cfg, threshold=cut), tmp_path / "m.pt")
    monkeypatch.setattr(cxr.evaluate.Inference, "probs", lambda *a, **k: 1 / 0)  # no second pass
    explain_files(tmp_path / "m.pt", FILES, tmp_path / "ex", device="cpu", amp="off", batch_size=len(FILES))
    monkeypatch.undo()
    rows = list(csv.DictReader((tmp_path / "ex" / "explanations.csv").read_text().splitlines()))
    preds = predict_files(tmp_path / "m.pt", FILES, device="cpu", amp="off", batch_size=len(FILES))
    assert [float(r["prob_pneumonia"]) for r in rows] == [p.prob_pneumonia for p in preds]
    assert [r["predicted"] for r in rows] == [p.label for p in preds]
    assert {p.label for p in preds} == {"NORMAL", "PNEUMONIA"}


def test_a_map_of_a_label_the_output_leans_away_from_is_titled_as_the_report_and_video_say(tmp_path, monkeypatch):
    # "heatmap: evidence for NORMAL; the output leans PNEUMONIA" read as the label's reason: "heatmap of NORMAL".
    from matplotlib.figure import Figure

    import cxr.evaluate
    import cxr.explain

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.6),
                    tmp_path / "m.pt")
    titles, savefig = [], Figure.savefig
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 8:16] = 1
    monkeypatch.setattr(cxr.explain, "heatmaps_for_images", lambda net, images, **kw: (
        np.stack([heat] * len(images)), np.full(len(images), 0.55)))
    monkeypatch.setattr(cxr.evaluate.Inference, "probs", lambda self, images, **kw: np.full(len(images), 0.55))
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: titles.append(fig._suptitle.get_text())
                        or savefig(fig, *a, **k))
    for amp in ("off", "on"):  # one pass and two
        explain_files(tmp_path / "m.pt", FILES[:1], tmp_path / amp, device="cpu", amp=amp)
    assert [t.splitlines()[-1] for t in titles] == ["heatmap of NORMAL; the output leans PNEUMONIA"] * 2, titles


def test_a_disk_that_fills_up_mid_way_is_the_error_said_not_the_listings(tmp_path, monkeypatch, caplog):
    # A picture's write failed on a full disk; the listing of those made so far failed too, and its error replaced
    # the real one ("cannot write explanations.csv"), with no word of the pictures left unlisted.
    import cxr.explain
    from cxr.errors import WriteError

    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    drawn = []

    def full_at_the_second(image, heat, *, path, **kw):
        drawn.append(path)
        if len(drawn) == 2:
            raise WriteError.from_os_error(path, OSError(28, "No space left on device"))
        path.write_bytes(b"png")

    monkeypatch.setattr(cxr.explain, "_explanation_figure", full_at_the_second)
    monkeypatch.setattr(cxr.explain, "_write_explanations", lambda *a: (_ for _ in ()).throw(
        WriteError.from_os_error(tmp_path / "out" / "explanations.csv", OSError(28, "No space left on device"))))
    with pytest.raises(WriteError) as e:
        explain_files(tmp_path / "m.pt", FILES, tmp_path / "out", device="cpu", batch_size=1)
    assert "_gradcam.png" in str(e.value), str(e.value)
    assert "stopped after 1 of" in caplog.text and "could not be listed" in caplog.text


def test_pictures_explained_into_a_class_folder_are_no_xrays_to_train_or_evaluate_on(tmp_path, caplog):
    # explain into data/test/NORMAL/cams was accepted, and evaluate then scored its pictures as NORMAL X-rays (10 of
    # a folder of 5); predict left them out, the data scan did not.
    from cxr.data import scan

    data = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / "test" / cls).mkdir(parents=True)
        for f in sorted((SAMPLE_DIR / "test" / cls).glob("*.jpeg"))[:3]:
            (data / "test" / cls / f.name).write_bytes(f.read_bytes())
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.5),
                    tmp_path / "m.pt")
    explain_files(tmp_path / "m.pt", [data / "test" / "NORMAL"], data / "test" / "NORMAL" / "cams", device="cpu")
    assert len(list((data / "test" / "NORMAL" / "cams").glob("*_gradcam.png"))) == 3
    caplog.clear()
    assert scan(data)["test"].counts() == {"NORMAL": 3, "PNEUMONIA": 3}
    assert "left out 3 Grad-CAM picture(s) written by cxr explain" in caplog.text


def _threshold_03_checkpoint(path) -> None:
    cfg = load_config(overrides={"image_size": 32, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg, threshold=0.3), path)


def test_with_bf16_the_heatmap_explains_the_class_the_threshold_gives(tmp_path, monkeypatch):
    # With bf16 (or channels_last) the maps take a pass of their own: at P 0.4 and threshold 0.3 the picture says
    # PNEUMONIA, and a map asked for no class at all would explain the larger logit's, NORMAL. Its flat map's title
    # says which way the output leans, as a map that is not flat says it.
    import cxr.evaluate
    import cxr.explain

    _threshold_03_checkpoint(tmp_path / "m.pt")
    targets, titles = [], []

    def maps(net, images, **kw):
        targets.append(None if kw["target"] is None else np.asarray(kw["target"]).tolist())
        return np.zeros((len(images), 32, 32), np.float32), np.full(len(images), 0.4)

    monkeypatch.setattr(cxr.explain, "heatmaps_for_images", maps)
    monkeypatch.setattr(cxr.evaluate.Inference, "probs", lambda self, images, **kw: np.full(len(images), 0.4))
    monkeypatch.setattr(cxr.explain, "_explanation_figure", lambda image, heat, *, title, path, cells:
                        titles.append(title) or path.write_bytes(b"png"))
    explain_files(tmp_path / "m.pt", FILES[:1], tmp_path / "out", device="cpu", amp="on")
    assert targets == [[1]]
    _, said, heatmap = titles[0].splitlines()
    assert said.startswith("predicted PNEUMONIA ")
    assert heatmap == "heatmap: flat, no region raised the score of PNEUMONIA; the output leans NORMAL"


def test_a_heatmap_of_another_class_than_the_label_keeps_the_label_in_the_listing(tmp_path, monkeypatch):
    # --target NORMAL explains NORMAL's map, but the model still says PNEUMONIA (P 0.4 >= threshold 0.3): the listing
    # had to give the label, not the class the map is of, in one pass (fp32) and in two (bf16).
    import cxr.evaluate
    import cxr.explain

    _threshold_03_checkpoint(tmp_path / "m.pt")
    targets = []

    def maps(net, images, **kw):
        targets.append(kw["target"])
        return np.zeros((len(images), 32, 32), np.float32), np.full(len(images), 0.4)

    monkeypatch.setattr(cxr.explain, "heatmaps_for_images", maps)
    monkeypatch.setattr(cxr.evaluate.Inference, "probs", lambda self, images, **kw: np.full(len(images), 0.4))
    for amp in ("off", "on"):
        explain_files(tmp_path / "m.pt", FILES, tmp_path / amp, device="cpu", amp=amp, target="NORMAL")
        with open(tmp_path / amp / "explanations.csv", newline="") as f:
            assert [r["predicted"] for r in csv.DictReader(f)] == ["PNEUMONIA"] * len(FILES), amp
    assert targets == [0, 0]


class _OneBlockNet(torch.nn.Module):
    """``layer4`` (as a ResNet's, what Grad-CAM explains) is ``block``; the logits are ``head`` of its mean."""

    def __init__(self, block: torch.nn.Module, head: list[list[float]]) -> None:
        super().__init__()
        self.layer4 = block
        self.fc = torch.nn.Linear(len(head[0]), 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


def test_a_map_where_nothing_raised_the_score_is_all_zeros_not_evidence_everywhere():
    # Every activation is >= 0 and PNEUMONIA's log-odds fall with each: no place speaks for it. A flat map is all ones
    # where the whole grid raised the score alike; this one must be all zeros (nothing shown), not all ones.
    net = _OneBlockNet(torch.nn.ReLU(), [[1.0], [-1.0]])
    x = torch.rand(2, 1, 4, 4) + 0.1
    cam, logits = grad_cam(net, x, target=1)
    assert cam.shape == (2, 4, 4) and (logits[:, 1] < logits[:, 0]).all()
    np.testing.assert_array_equal(cam, np.zeros((2, 4, 4), np.float32))
    uniform, _ = grad_cam(net, torch.ones(1, 1, 4, 4), target=0)  # evidence everywhere, alike: all ones
    np.testing.assert_array_equal(uniform, np.ones((1, 4, 4), np.float32))


def test_a_grid_alike_to_float_rounding_gives_a_uniform_map_not_stretched_noise():
    # Two cells of 1.0 and 1.0000001 (one float32 step apart): their difference is rounding, not a region that
    # stands out. Stretched to [0, 1] it had been drawn as half the picture's "evidence".
    grid = torch.ones(1, 1, 2, 2)
    grid[0, 0, 0, 0] = 1.0 + 1e-7
    assert grid[0, 0, 0, 0] > 1.0
    cam, _ = grad_cam(_OneBlockNet(torch.nn.Identity(), [[0.0], [1.0]]), grid, target=1)
    np.testing.assert_array_equal(cam, np.ones((1, 2, 2), np.float32))
    grid[0, 0, 0, 0] = 1.01  # a real difference is still stretched
    cam, _ = grad_cam(_OneBlockNet(torch.nn.Identity(), [[0.0], [1.0]]), grid, target=1)
    assert cam[0, 0, 0] == 1.0 and cam[0, 1, 1] == 0.0


def test_picture_names_that_differ_only_in_case_are_told_apart_in_either_order():
    # On macOS and Windows Scan_gradcam.png and scan_gradcam.png are one file: the second picture overwrote the first.
    from pathlib import Path

    from cxr.explain import _unique_name

    used: set[str] = set()
    assert [_unique_name(Path(p), used) for p in ("a/Scan.png", "b/scan.png", "c/SCAN.PNG", "d/scan_2.png")] == \
        ["Scan_gradcam.png", "scan_2_gradcam.png", "SCAN_3_gradcam.png", "scan_2_2_gradcam.png"]
    used = set()
    assert [_unique_name(Path(p), used) for p in ("scan.png", "Scan.png")] == ["scan_gradcam.png",
                                                                             "Scan_2_gradcam.png"]
    # And on macOS café in NFC and in NFD (a folder copied from Linux beside one made on the Mac) is one name too.
    used = set()
    assert [_unique_name(Path(p), used) for p in ("a/caf\u00e9.png", "b/cafe\u0301.png")] == \
        ["caf\u00e9_gradcam.png", "cafe\u0301_2_gradcam.png"]


def test_grad_cam_leaves_a_model_in_the_mode_it_found_it_in():
    # A model in training (a callback drawing maps between epochs) had been left in eval mode: its batch norm's
    # running statistics frozen and dropout off for the rest of the training. A module kept in eval stays so.
    from cxr.explain import grad_cam
    from cxr.model import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", "none").train()
    net.bn1.eval()
    before = {name: m.training for name, m in net.named_modules()}
    maps, _ = grad_cam(net, torch.randn(2, 1, 32, 32), 1)
    assert {name: m.training for name, m in net.named_modules()} == before and maps.shape == (2, 32, 32)
    assert net.training and not net.bn1.training


def test_every_colour_bar_shows_the_heat_as_the_overlay_lays_it_over_grey(tmp_path):
    # The bars drew the bare colour map (viridis' purple at 0), while the overlay's opacity grows with the heat: low
    # heat is hardly coloured, and no picture had the bar's purples and blues.
    import re

    from cxr.images import LEGEND_GREY, heat_legend, heat_legend_cmap, overlay
    from cxr.serve import STATIC_DIR

    legend = heat_legend(5)
    grey = np.full((1, 5), LEGEND_GREY, np.uint8)
    assert np.array_equal(legend, overlay(grey, np.linspace(0, 1, 5, dtype=np.float32)[None])[0])
    assert tuple(legend[0]) == (LEGEND_GREY,) * 3  # no heat: the X-ray as it is
    assert np.allclose(heat_legend_cmap()(1.0)[:3], heat_legend()[-1] / 255)
    css = (STATIC_DIR / "style.css").read_text()
    ramp = re.search(r"\.scale \.ramp \{[^}]*linear-gradient\(to right, ([^)]*)\)", css)[1]
    assert [c.strip() for c in ramp.split(",")] == ["#" + bytes(c.tolist()).hex() for c in heat_legend(10)]


def test_heatmaps_of_images_of_another_size_than_the_models_are_refused_and_inference_gives_them_whole():
    # A 64 px image for the 224 px bundled model had given a map and P 0.987 (1.000 at 224) without a word, where
    # Inference.probs refused it; Inference.heatmaps passes the model's size, mean, std and threshold itself.
    from cxr.errors import UsageError
    from cxr.evaluate import load_for_inference
    from cxr.images import load_image

    inf = load_for_inference("default", device="cpu")
    small = load_image(FILES[0], 64)[None]
    with pytest.raises(UsageError, match=r"shape \(N, 224, 224\)"):
        heatmaps_for_images(inf.net, small, mean=inf.cfg.mean, std=inf.cfg.std, image_size=inf.cfg.image_size)
    with pytest.raises(UsageError, match=r"shape \(N, 224, 224\)"):
        inf.heatmaps(small)
    images = np.stack([load_image(f, 224) for f in FILES[:2]])
    heats, probs = inf.heatmaps(images)
    expected = heatmaps_for_images(inf.net, images, mean=inf.cfg.mean, std=inf.cfg.std, threshold=inf.threshold)
    assert np.array_equal(heats, expected[0]) and np.array_equal(probs, expected[1])
    assert np.array_equal(probs, inf.probs(images)) and heats.shape == (2, 224, 224)


def test_explain_the_report_and_the_video_draw_their_scales_as_the_overlay_shows_heat(tmp_path, monkeypatch):
    # The function and the page's CSS were pinned, but each picture's bar could have gone back to the bare colour map.
    import matplotlib.pyplot as plt

    import cxr.images
    from cxr.images import LEGEND_GREY, heat_legend_cmap
    from cxr.report import GridTile, plot_grid
    from cxr.video import VideoItem, render_frame

    used = []
    monkeypatch.setattr(cxr.images, "heat_legend_cmap", lambda: used.append(1) or heat_legend_cmap())
    monkeypatch.setattr("cxr.explain.heat_legend_cmap", cxr.images.heat_legend_cmap)
    torch.manual_seed(0)
    cfg = load_config(overrides={"image_size": 64, "arch": "resnet18"})
    save_checkpoint(Checkpoint("resnet18", build_model("resnet18", "none").state_dict(), cfg), tmp_path / "m.pt")
    explain_files(tmp_path / "m.pt", FILES[:1], tmp_path / "ex", device="cpu", amp="off")
    assert used == [1]  # explain's picture
    image, heat = np.full((64, 64), 100, np.uint8), np.ones((64, 64), np.float32)
    plt.close(plot_grid({"right": [GridTile(image, heat, 1, 0.9, "a.png")]}, 0.5, "val"))
    assert used == [1, 1]  # the report's grid
    frame = render_frame(VideoItem("a.png", 1, 0.9, image, heat), index=0, total=1, right=1, wrong=0, threshold=0.5,
                         history=[True])
    # the video's legend starts at heat 0 over mid grey: the grey itself (viridis' purple had been drawn)
    assert (frame == LEGEND_GREY).all(axis=2).any() and not (frame == (68, 1, 84)).all(axis=2).any()
