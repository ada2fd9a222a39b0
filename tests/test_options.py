"""Every option through one schema, every destination through one guard, runs that know their classes
(docs/reliability.md names each case)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import image_folder
from PIL import Image

import lesa.cli as cli_module
from lesa.classification import build_config
from lesa.cli import main
from lesa.errors import ConfigError
from lesa.options import load_yaml

QUICK = ["--model", "resnet_tiny", "--img-size", "16", "--epochs", "1", "--batch-size", "4", "--quiet"]


def run_cli(capsys, *args) -> tuple[int, str]:
    """``lesa ARGS``: the exit code and stderr, which is at most one line and never a traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) <= 1, err
    return code, err


@pytest.fixture
def no_work(monkeypatch):
    """Replace every command's work by a recorder: what reaches it passed validation and the guard."""
    ran = []
    commands = dict(cli_module.COMMANDS)
    for name, (help_text, add, make, _) in commands.items():
        commands[name] = (help_text, add, make, lambda options, name=name: ran.append((name, options)) or 0)
    monkeypatch.setattr(cli_module, "COMMANDS", commands)
    return ran


# -- options: one schema --------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size: got 0; use a value >= 1"),
    (["eval", "--checkpoint", "x", "--workers", "-1"], "--workers: got -1; use a value >= 0"),
    (["train", "--warmup-epochs", "nan"], "--warmup-epochs: got nan; give a finite number"),
    (["train", "--lr", "inf"], "--lr: got inf; give a finite number"),
    (["train", "--device", "cuda:x"], "--device: got 'cuda:x'; a device is auto, cpu, cuda or cuda:N"),
    (["det", "predict", "a.png", "--checkpoint", "c", "--output", "o", "--score-threshold", "1.5"],
     "--score-threshold: got 1.5; use a value <= 1"),
    (["det", "train", "--min-size", "900", "--max-size", "300"], "--min-size 900 exceeds --max-size 300"),
    (["det", "eval", "--checkpoint", "c", "--max-images", "0"], "--max-images: got 0"),
    (["analyze", "run", "--query", "1", "-2"], "--query[1]: got -2; use a value >= 0"),
    (["compare", "--quick", "--seeds", "0"], "--seeds: got 0; use a value >= 1"),
    (["export", "ckpt.pt", "out.txt"], "OUTPUT: got 'out.txt'; use a file name ending in .onnx or .pt2"),
    (["convert", "in.pth", "out.bin"], "OUTPUT: got 'out.bin'; use a file name ending in .pth or .pt or"),
    (["export", "ckpt.pt", "out.onnx", "--opset", "0"], "--opset: got 0; use a value >= 1"),
])
def test_bad_option_values_are_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, no_work, args, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *args)
    assert code == 2 and message in err and not no_work


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_a_device_the_machine_lacks_is_refused(tmp_path, capsys, no_work):
    code, err = run_cli(capsys, "train", "--device", "cuda", "--output", tmp_path / "r")
    assert code == 2 and "CUDA is not available on this machine; use auto or cpu" in err


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: start the processes "
                          "with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost"}, "MASTER_PORT is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be an integer >= 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be an integer >= 1"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be an integer >= 0"),
    ({"RANK": "1"}, "RANK=1 is not below WORLD_SIZE=1"),  # was DistributedSampler's traceback
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not a port"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a"),
])
def test_a_partial_torchrun_environment_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, env, message):
    """A WORLD_SIZE left exported in a shell used to end in torch.distributed's rendezvous traceback."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = run_cli(capsys, "train", *QUICK, "--output", tmp_path / "r")
    assert code == 2 and message in err and not (tmp_path / "r").exists()


def test_a_process_group_started_by_hand_says_what_it_waits_for(monkeypatch, capsys):
    """torch's rendezvous waits 30 minutes in silence for processes that a leftover WORLD_SIZE promised."""
    import lesa.engine.distributed as distributed

    joined = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: joined.append(backend))
    for name, value in dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    ctx = distributed.setup_distributed("cpu")
    assert (ctx.rank, ctx.world_size, joined) == (1, 2, ["gloo"])
    assert "process 1 of 2 waiting for the others at 10.0.0.7:29500" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun's own processes: torchrun reports
    distributed.setup_distributed("cpu")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text,message", [
    ("epochs: 3\nlr: 0.1\nepochs: 4\n", "option 'epochs' is given twice (lines 1 and 3); keep one"),
    (b"model: caf\xe9\n", "is not UTF-8 (byte 0xe9 on line 1); save it as UTF-8"),
    ("- epochs\n", "must hold a mapping of option: value"),
    ("model_kwargs: {img_size: 64}\n", "model_kwargs: img_size is set by the option img_size"),
    ("model_kwargs: {num_classes: 3}\n", "model_kwargs: num_classes is set by the data's class count"),
    ("label_smoothing: .nan\n", "label_smoothing in CONFIG: got nan; give a finite number"),
    ("batch_size: true\n", "batch_size in CONFIG: got True; give a whole number"),
    ("epocs: 3\n", "unknown option(s) epocs in CONFIG (did you mean epochs?)"),
    ("preset: imagenet2\n", "unknown preset 'imagenet2'"),
])
def test_yaml_files_are_checked_like_the_command_line(tmp_path, capsys, no_work, text, message):
    config = tmp_path / "run.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_cli(capsys, "train", "--config", config, "--output", tmp_path / "r")
    assert code == 2 and message.replace("CONFIG", str(config)) in err and not no_work


def test_yaml_with_a_byte_order_mark_and_layer_options_at_the_top(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes("\ufeffheads: 4\npos_embed: rel2d\nepochs: 2\n".encode())
    assert load_yaml(config) == {"heads": 4, "pos_embed": "rel2d", "epochs": 2}
    cfg = build_config(str(config), heads=2)  # the command line wins, the file's other layer option stays
    assert cfg.model_kwargs == {"heads": 2, "pos_embed": "rel2d"} and cfg.epochs == 2


def test_a_yaml_file_extends_another_file_or_a_preset(tmp_path):
    """``extends:`` was refused as an unknown option in a user's file (only the shipped recipes had it)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text("preset: fashion_mnist\nepochs: 5\nheads: 2\nlr: 0.2\n")
    (tmp_path / "base" / "mid.yaml").write_text("extends: common.yaml\nbatch_size: 16\ntrain_subset: 100\n")
    (tmp_path / "run.yaml").write_text("extends: base/mid.yaml\nlr: 0.1\npos_embed: rel2d\ntrain_subset: null\n")
    cfg = build_config(str(tmp_path / "run.yaml"), epochs=3)
    # preset < base files (in order) < the file < the command line; a file's null undoes its base's value
    assert (cfg.preset, cfg.img_size, cfg.epochs, cfg.batch_size, cfg.lr, cfg.train_subset) == \
        ("fashion_mnist", 28, 3, 16, 0.1, None)
    assert cfg.model_kwargs == {"heads": 2, "pos_embed": "rel2d"}
    (tmp_path / "p.yaml").write_text("extends: digits\nepochs: 2\npreset: null\n")
    assert build_config(str(tmp_path / "p.yaml")).preset == "digits"


def test_a_config_name_the_system_cannot_look_up_is_one_line(tmp_path, capsys, no_work):
    code, err = run_cli(capsys, "train", "--config", tmp_path / ("y" * 300 + ".yaml"), "--output", tmp_path / "r")
    assert code == 2 and "cannot be read (OSError: File name too long); pass a readable YAML file" in err


def test_a_files_null_is_the_value_none_named_where_an_option_takes_none(tmp_path, capsys, no_work):
    """null clears a base's value where None is valid; elsewhere the error names the file (a null layer option
    was dropped silently before)."""
    (tmp_path / "base.yaml").write_text("epochs: 7\ntrain_subset: 100\nmodel_kwargs: {heads: 2, pos_embed: rel2d}\n")
    (tmp_path / "run.yaml").write_text("extends: base.yaml\ntrain_subset: null\n")
    assert build_config(str(tmp_path / "run.yaml")).train_subset is None
    (tmp_path / "run.yaml").write_text("extends: base.yaml\nepochs: null\n")
    code, err = run_cli(capsys, "train", "--config", tmp_path / "run.yaml", "--output", tmp_path / "r")
    assert code == 2 and f"epochs in {tmp_path / 'run.yaml'}: got None" in err and not no_work
    (tmp_path / "run.yaml").write_text("extends: base.yaml\nheads: null\n")
    code, err = run_cli(capsys, "train", "--config", tmp_path / "run.yaml", "--output", tmp_path / "r")
    assert code == 2 and "heads" in err and "None" in err and not no_work


def test_extends_expands_the_home_folder_and_refuses_symlink_loops(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "home.yaml").write_text("epochs: 4\n")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text("extends: ~/home.yaml\n")
    assert build_config(str(tmp_path / "cfg" / "run.yaml")).epochs == 4
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    (tmp_path / "loop.yaml").write_text("extends: a.yaml\n")
    code, err = run_cli(capsys, "train", "--config", tmp_path / "loop.yaml", "--output", tmp_path / "r")
    assert code == 2 and "extends in" in err and "cannot be looked up" in err and not no_work


@pytest.mark.parametrize("files,message", [
    ({"run.yaml": "extends: run.yaml\n"}, "extends in RUN: run.yaml leads back to RUN (a cycle of extends)"),
    ({"run.yaml": "extends: b.yaml\n", "b.yaml": "extends: run.yaml\n"}, "(a cycle of extends); remove one"),
    ({"run.yaml": "extends: missing.yaml\n"}, "missing.yaml' does not exist; the path is relative to run.yaml's"),
    ({"run.yaml": "extends: imagenet2\n"}, "unknown preset 'imagenet2' (did you mean imagenet?)"),
    ({"run.yaml": "extends: fashion-mnist\n"}, "(did you mean fashion_mnist?); choose one of"),
    ({"run.yaml": "extends: b.yaml\n", "b.yaml": "preset: digit\n"}, "preset in B: unknown preset 'digit' (did"),
    ({"run.yaml": "extends: b.yaml\n", "b.yaml": "heads: 4\nmodel_kwargs: {heads: 8}\n"},
     "heads is given twice, as 4 and as 8 in model_kwargs in B; keep one"),
    ({"run.yaml": "extends: \"a\\0.yaml\"\n"}, "cannot be looked up"),
    ({"run.yaml": f"extends: {'x' * 300}.yaml\n"}, "cannot be looked up"),
    ({"run.yaml": "extends: b.yaml\n", "b.yaml/x": ""}, "b.yaml' is a folder, not a YAML file"),
    ({"run.yaml": "extends: [a.yaml]\n"}, "extends in RUN: got ['a.yaml']; name a YAML file"),
    ({"run.yaml": "extends: digits\npreset: imagenet\n"}, "names preset 'digits' and preset names 'imagenet'"),
    ({"run.yaml": "extends: b.yaml\n", "b.yaml": "epocs: 3\n"}, "unknown option(s) epocs in B (did you mean"),
    ({"run.yaml": "extends: b.yaml\n", "b.yaml": "lr: .nan\n"}, "lr in B: got nan"),
])
def test_extends_errors_name_the_file_and_the_fix(tmp_path, capsys, no_work, files, message):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    code, err = run_cli(capsys, "train", "--config", tmp_path / "run.yaml", "--output", tmp_path / "r")
    expected = message.replace("RUN", str(tmp_path / "run.yaml")).replace("B", str(tmp_path / "b.yaml"))
    assert code == 2 and expected in err and not no_work


def test_the_layer_options_of_the_model_are_checked_up_front(tmp_path, capsys, no_work):
    config = tmp_path / "run.yaml"
    config.write_text("model_kwargs: {heads: [4]}\n")
    code, err = run_cli(capsys, "train", "--config", config, "--output", tmp_path / "r")
    assert code == 2 and "heads" in err and not no_work
    with pytest.raises(ConfigError, match="resnet_tiny does not use the layer option"):
        build_config(model="resnet_tiny", heads=4)


# -- outputs: one guard ---------------------------------------------------------------------------------
def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "c").write_bytes(b"a checkpoint")  # inputs exist: a missing one would be named first
    for output, message in [
        (tmp_path / "afile", "is a file, not a directory"),
        (tmp_path / "afile" / "run", "is a file, so nothing can be created under it"),
        (tmp_path / ("x" * 300), "is 300 bytes, longer than this file system allows"),
    ]:
        for command in (["train"], ["analyze", tmp_path], ["compare", "--quick"],
                        ["det", "predict", tmp_path / "afile", "--checkpoint", tmp_path / "c"]):
            code, err = run_cli(capsys, *command, "--output", output)
            assert code == 2 and message in err, (command, err)
    assert (tmp_path / "afile").read_text() == "keep me" and not no_work


def test_an_unwritable_destination_is_refused(tmp_path, capsys, monkeypatch, no_work):
    # as root every directory is writable, so the refusal is tested through the permission check itself
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    code, err = run_cli(capsys, "train", "--output", tmp_path / "ro" / "run")
    assert code == 2 and "ro is not writable by this user" in err and not no_work


def test_no_command_overwrites_its_input(tmp_path, capsys, no_work):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(photos / name)
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"checkpoint")
    cases = [
        (["det", "predict", photos / "a.png", photos / "b.png", "--checkpoint", ckpt, "--output", photos],
         "is also this command's input"),
        (["convert", ckpt, ckpt], "is also this command's input"),
        (["convert", ckpt, tmp_path / "." / "ckpt.pth"], "is also this command's input"),
        (["export", ckpt, ckpt], "use a file name ending in .onnx or .pt2"),
    ]
    for args, message in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2 and message in err, (args, err)
    assert ckpt.read_bytes() == b"checkpoint" and not no_work
    # a symlink to the input is the input
    (tmp_path / "link.pth").symlink_to(ckpt)
    code, err = run_cli(capsys, "convert", ckpt, tmp_path / "link.pth")
    assert code == 2 and "is also this command's input" in err


def test_valid_options_reach_the_command(tmp_path, capsys, no_work):
    (tmp_path / "x").write_bytes(b"a checkpoint")
    assert run_cli(capsys, "eval", "--checkpoint", tmp_path / "x", "--device", "cpu")[0] == 0
    assert run_cli(capsys, "det", "predict", "a.png", "--checkpoint", tmp_path / "x", "--output", tmp_path / "out"
                   )[0] == 0
    (name, options), (name2, options2) = no_work
    assert (name, options.batch_size, options.device) == ("eval", 128, "cpu")
    assert name2 == "det" and options2.images == ["a.png"] and options2.score_threshold == 0.5


# -- runs know their classes ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("classes")
    image_folder(root / "data", ("cat", "dog", "owl"), n=4)
    out = root / "run"
    assert main(["train", *QUICK, "--data", str(root / "data"), "--output", str(out)]) == 0
    return root, out


def test_checkpoints_and_summary_carry_the_classes(folder_run):
    _, out = folder_run
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["classes"] == ["cat", "dog", "owl"]
    assert state["data_identity"]["classes"] == ["cat", "dog", "owl"] and state["data_identity"]["train_images"] == 12


@pytest.mark.parametrize("change,message", [
    ("add", "classes added: ['emu']; missing: none"),
    ("rename", "classes added: ['wolf']; missing: ['owl']"),
])
def test_resume_refuses_data_whose_classes_changed(tmp_path, capsys, change, message):
    data, run = tmp_path / "data", tmp_path / "run"
    image_folder(data, ("cat", "dog", "owl"), n=4)
    assert run_cli(capsys, "train", *QUICK, "--data", data, "--output", run)[0] == 0
    for split in ("train", "val"):
        if change == "add":
            shutil.copytree(data / split / "owl", data / split / "emu")
        else:
            (data / split / "owl").rename(data / split / "wolf")
    last = (run / "last.pt").read_bytes()
    code, err = run_cli(capsys, "train", *QUICK, "--epochs", "2", "--data", data, "--output", run, "--resume")
    assert code == 2 and message in err and "--resume: the run in" in err
    assert (run / "last.pt").read_bytes() == last


def test_eval_maps_classes_by_name_and_refuses_unknown_ones(tmp_path, capsys, folder_run):
    from lesa.classification import evaluate_checkpoint, load_trained_model
    from lesa.classification.predict import classification_data

    root, out = folder_run
    subset = tmp_path / "subset"  # the same images without one class: its labels shift unless mapped by name
    shutil.copytree(root / "data", subset)
    for split in ("train", "val"):
        shutil.rmtree(subset / split / "cat")
    part = evaluate_checkpoint(out, str(subset), quiet=True)
    model, cfg = load_trained_model(out)
    full = classification_data(cfg["model"], str(root / "data"), cfg["img_size"], train=False).val
    with torch.no_grad():
        hits = sum(int(model.eval()(image[None]).argmax()) == label for image, label in full if label != 0)
    assert part["n"] == 8 and round(part["top1"] * 8 / 100) == hits
    for split in ("train", "val"):
        (subset / split / "dog").rename(subset / split / "fox")
    code, err = run_cli(capsys, "eval", "--checkpoint", out, "--data", subset)
    assert code == 2 and "not among the model's: ['fox']" in err


# -- outputs, names, YAML and checkpoints a new user tried (each was a traceback, a wrong result or a lost file) --
def test_convert_refuses_to_write_into_its_inputs_folder(folder_run, capsys, no_work):
    _, run = folder_run
    best = (run / "best.pt").read_bytes()
    code, err = run_cli(capsys, "convert", run, run / "best.pt")  # the reader takes RUN as RUN/best.pt
    assert code == 2 and "exists in the folder of this command's input" in err
    assert (run / "best.pt").read_bytes() == best and not no_work


def test_det_predict_never_replaces_a_users_file_with_a_drawing(tmp_path, capsys, folder_run, no_work):
    _, run = folder_run
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.jpg")
    Image.new("RGB", (8, 8)).save(photos / "a.png")  # the user's own file, where the drawing of a.jpg would go
    code, err = run_cli(capsys, "det", "predict", photos / "a.jpg", "--checkpoint", run, "--output", photos)
    assert code == 2 and "a.png exists in the folder" in err and not no_work


def test_an_output_that_is_a_dangling_link_is_named(tmp_path, capsys, no_work):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "dir")
    code, err = run_cli(capsys, "train", "--output", tmp_path / "dangling")
    assert code == 2 and "which does not exist; remove the link" in err and not no_work


def test_an_output_inside_the_data_folder_is_refused(folder_run, capsys, no_work):
    root, _ = folder_run
    code, err = run_cli(capsys, "train", "--data", root / "data", "--output", root / "data" / "train" / "cat" / "r")
    assert code == 2 and "is inside the data folder" in err and not no_work


def test_a_seed_beyond_numpys_range_is_named_with_the_limit(tmp_path, capsys, no_work):
    code, err = run_cli(capsys, "train", "--output", tmp_path / "r", "--seed", str(2**64))
    assert code == 2 and "--seed: got 18446744073709551616; use a value <= 4294967295" in err
    assert run_cli(capsys, "train", "--output", tmp_path / "r2")[0] == 0 and len(no_work) == 1


def test_det_predict_gives_every_image_its_own_drawing():
    from lesa.detection.predict import output_names

    names = output_names(["p/x.png", "p/x.png", "q/p_x_2.png"])
    assert len(set(names)) == 3  # was: p_x_2.png twice, one drawing lost


def test_an_option_is_named_as_its_command_spells_it(tmp_path, capsys, no_work):
    (tmp_path / "t.sh").write_text("#!/bin/sh\n")
    code, err = run_cli(capsys, "train", "--output", tmp_path / "t.sh")
    assert code == 2 and err.startswith("lesa train: error: --output ")  # was: named OUTPUT (convert's positional)


@pytest.mark.parametrize(("text", "expected", "message"), [
    ("<<: {epochs: 1}\nlr: 0.1\n", 0, ""),  # a merge key is valid YAML
    ("heads: 2\nmodel_kwargs: {heads: 4}\n", 2, "heads is given twice, as 2 and as 4 in model_kwargs"),
    ("lr: 1e-3\n", 2, "YAML reads a number like 1e-3 as text: write 1.0e-3 or 0.001"),
])
def test_a_config_file_is_read_as_yaml_means_it(tmp_path, capsys, no_work, text, expected, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code, err = run_cli(capsys, "train", "--config", config, "--output", tmp_path / "r")
    assert code == expected and message in err, (text, err)


def test_an_empty_config_name_is_named(tmp_path, capsys, no_work):
    code, err = run_cli(capsys, "train", "--config", "", "--output", tmp_path / "r")
    assert code == 2 and "--config is empty" in err


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--lr", "abc"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "invalid float value: 'abc' (see" in err


def test_a_text_file_named_like_a_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "text.pt").write_text("hi\n")
    code, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "text.pt", "--model", "resnet_tiny")
    assert code == 2 and "is not a torch checkpoint" in err  # was: KeyError traceback


def test_weights_evaluated_on_data_with_fewer_classes_are_refused(tmp_path, capsys, folder_run):
    _, run = folder_run
    assert run_cli(capsys, "convert", run / "best.pt", tmp_path / "w.pth")[0] == 0
    image_folder(tmp_path / "two", n=2)
    code, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "w.pth", "--model", "resnet_tiny", "--data",
                        tmp_path / "two", "--quiet")
    assert code == 2 and "the model has 3 classes" in err  # was: top-1 0.00%, exit 0


def test_a_run_stores_its_data_folder_absolute(folder_run):
    root, run = folder_run
    assert json.loads((run / "summary.json").read_text())["data"] == str((root / "data").resolve())


# -- what each command says first -----------------------------------------------------------------------------
def test_a_missing_input_is_named_before_any_problem_with_the_output(tmp_path, capsys, no_work):
    (tmp_path / "out.safetensors").write_bytes(b"the user's")
    code, err = run_cli(capsys, "convert", tmp_path / "none.pth", tmp_path / "out.safetensors")
    assert code == 2 and err.endswith(f"INPUT '{tmp_path / 'none.pth'}' does not exist")
    code, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "none.pt")
    assert code == 2 and "--checkpoint" in err and "does not exist" in err and not no_work


def test_an_existing_file_outside_lesas_folders_is_kept_with_a_fix_that_works(tmp_path, capsys, no_work):
    (tmp_path / "in.pth").write_bytes(b"weights")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "w.safetensors").write_bytes(b"an earlier conversion")
    code, err = run_cli(capsys, "convert", tmp_path / "in.pth", tmp_path / "out" / "w.safetensors")
    assert code == 2 and "lesa replaces no file outside the folders it made" in err
    assert "delete the file first" in err and not no_work


@pytest.mark.parametrize("args,message", [
    (["convert", "IN", "OUT.pt", "--img-size", "24"], "--img-size describes the model of --model, which is not given"),
    (["det", "train", "--dcn-stages", "2", "2"], "--dcn-stages 2 2 names a stage twice"),
    (["compare", "--quick", "--ops", "sa", "--ops", "sa"], "--ops: got ['sa', 'sa']; names sa more than once"),
    (["det", "train", "--pos-init", "interpolate"], "--pos-init interpolate acts on the tables of --pretrained"),
])
def test_options_that_act_on_nothing_are_refused(tmp_path, capsys, no_work, args, message):
    (tmp_path / "IN").write_bytes(b"weights")
    args = [str(tmp_path / a) if a in ("IN", "OUT.pt") else a for a in args]
    code, err = run_cli(capsys, *args, *(["--output", tmp_path / "o"] if args[0] == "det" else []))
    assert code == 2 and message in err and not no_work


def test_an_unknown_option_in_a_file_lists_the_layer_options_too(tmp_path, capsys, no_work):
    (tmp_path / "run.yaml").write_text("headz: 2\n")
    code, err = run_cli(capsys, "train", "--config", tmp_path / "run.yaml", "--output", tmp_path / "r")
    assert code == 2 and "headz in" in err and "(did you mean heads?)" in err
    assert all(f" {name}," in err for name in ("heads", "impl", "pos_embed")) and not no_work

