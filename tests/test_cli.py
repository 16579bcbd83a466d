"""The lift-kernels command line: absorb and ask end to end on a checkpoint saved with
save_pretrained, and one exit code per kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from lift_kernels.cli import EXIT_CODES, main

from lift_tiny import make_document, make_tokenizer, one_thread, save_checkpoint  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--segment-length", "32", "--segment-stride", "16", "--epochs", "2", "--qa-epochs", "1",
        "--steps-per-epoch", "2", "--lr", "0.1", "--backend", "torch"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny checkpoint, a document, a QA file, and a memory absorbed in-process."""
    root = tmp_path_factory.mktemp("cli")
    save_checkpoint(root / "model")
    (root / "doc.txt").write_text(make_document(80, seed=3))
    (root / "qa.json").write_text(json.dumps([{"question": "what is red ?",
                                               "answer": "the tower"}]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rc = main(["absorb", "--model", str(root / "model"), "--document", str(root / "doc.txt"),
               "--out", str(root / "memory.safetensors"), "--quiet", *FAST])
    torch.set_num_threads(threads)
    assert rc == 0
    return root


def test_absorb_then_ask_end_to_end_through_the_command_line(workdir, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "memory.safetensors"
    absorb = subprocess.run(
        [sys.executable, "-m", "lift_kernels", "absorb", "--model", str(workdir / "model"),
         "--document", str(workdir / "doc.txt"), "--qa", str(workdir / "qa.json"),
         "--out", str(out), "--json", "--seed", "1", *FAST],
        capture_output=True, text=True, env=env, timeout=300)
    assert absorb.returncode == 0, absorb.stderr
    report = json.loads(absorb.stdout)
    assert report["num_qa"] == 1 and report["steps"] == 6 and report["world_size"] == 1
    assert report["last_loss"] < report["first_loss"]
    assert report["tokens_per_second"] > 0 and out.is_file()

    # ask in-process (the same main() as the console script; saves an interpreter start).
    rc = main(["ask", "--model", str(workdir / "model"), "--memory", str(out), "--question",
               "what is red ?", "--document", str(workdir / "doc.txt"), "--max-new-tokens", "5",
               "--json"])
    assert rc == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["adapter"] == "gated-memory" and reply["with_document"] is True
    assert isinstance(reply["answer"], str) and reply["answer"]


def test_ask_plain_output(workdir, capsys):
    rc = main(["ask", "--model", str(workdir / "model"), "--memory",
               str(workdir / "memory.safetensors"), "--question", "who ?",
               "--max-new-tokens", "3"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


def _absorb(workdir, tmp_path, *extra, document=None, model=None):
    return main(["absorb", "--model", str(model or workdir / "model"), "--document",
                 str(document or workdir / "doc.txt"), "--out", str(tmp_path / "m.safetensors"),
                 "--quiet", *FAST, *extra])


def _error(capsys, rc, kind, message):
    err = capsys.readouterr().err
    assert rc == EXIT_CODES[kind], err
    assert message in err, err


def test_document_errors(workdir, tmp_path, capsys):
    _error(capsys, _absorb(workdir, tmp_path, document=tmp_path / "nope.txt"),
           "document", "does not exist")
    (tmp_path / "empty.txt").write_text("   \n")
    _error(capsys, _absorb(workdir, tmp_path, document=tmp_path / "empty.txt"),
           "document", "is empty")
    _error(capsys, _absorb(workdir, tmp_path, document=tmp_path), "document", "directory")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    _error(capsys, _absorb(workdir, tmp_path, document=tmp_path / "bin.txt"),
           "document", "not UTF-8")


def test_model_errors(workdir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig

    _error(capsys, _absorb(workdir, tmp_path, model=tmp_path / "missing"), "model",
           "is not a directory")
    (tmp_path / "empty_dir").mkdir()
    _error(capsys, _absorb(workdir, tmp_path, model=tmp_path / "empty_dir"), "model",
           "no readable Hugging Face config")
    ViTConfig().save_pretrained(tmp_path / "vit")
    _error(capsys, _absorb(workdir, tmp_path, model=tmp_path / "vit"), "model",
           "not a causal language model")

    tok = make_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    _error(capsys, _absorb(workdir, tmp_path, model=tmp_path / "gpt2"), "unsupported",
           "supported families: cohere, cohere2, gemma")


def test_memory_file_errors(workdir, tmp_path, capsys):
    from safetensors.torch import save_file

    def ask(memory, model=None):
        return main(["ask", "--model", str(model or workdir / "model"), "--memory", str(memory),
                     "--question", "who ?"])

    _error(capsys, ask(tmp_path / "none.safetensors"), "memory", "does not exist")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    _error(capsys, ask(tmp_path / "junk.safetensors"), "memory", "not a safetensors file")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    _error(capsys, ask(tmp_path / "other.safetensors"), "memory", "not a lift-kernels memory")
    save_checkpoint(tmp_path / "other_model", seed=7)
    _error(capsys, ask(workdir / "memory.safetensors", tmp_path / "other_model"), "memory",
           "made for another base model")
    rc = main(["ask", "--model", str(tmp_path / "other_model"), "--memory",
               str(workdir / "memory.safetensors"), "--question", "who ?", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == report["exit_code"] == EXIT_CODES["memory"] and report["error"] == "memory"


def test_qa_and_option_errors(workdir, tmp_path, capsys):
    (tmp_path / "qa.json").write_text('[{"question": "who ?"}]')
    _error(capsys, _absorb(workdir, tmp_path, "--qa", str(tmp_path / "qa.json")), "qa",
           'item 0 has no "answer"')
    _error(capsys, _absorb(workdir, tmp_path, "--segment-stride", "64"), "usage",
           "segment_stride")
    rc = main(["absorb", "--model", str(workdir / "model"), "--document",
               str(workdir / "doc.txt"), "--out", str(tmp_path / "no" / "dir" / "m.st")])
    _error(capsys, rc, "usage", "does not exist")
    with pytest.raises(SystemExit) as exit_info:
        main(["absorb", "--model", "demo"])
    assert exit_info.value.code == EXIT_CODES["usage"]


def test_bench_delegates_to_the_benchmark(monkeypatch):
    seen = []
    fake = types.ModuleType("lift_kernels.benchmark")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lift_kernels.benchmark", fake)
    assert main(["bench", "--quick", "--json", "x.json"]) == 0
    assert seen == [["--quick", "--json", "x.json"]]


def test_config_file_sets_recipe_fields(workdir, tmp_path, capsys):
    from safetensors import safe_open

    (tmp_path / "recipe.json").write_text(json.dumps({"memory": {"mem_hidden": 8},
                                                      "segment_epochs": 1}))
    assert _absorb(workdir, tmp_path, "--config", str(tmp_path / "recipe.json")) == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert list(f.get_slice("layers.0.w1").get_shape()) == [4, 8, 8]
        recorded = json.loads(f.metadata()["lift.config"])
    assert recorded["segment_epochs"] == 2  # the command line wins over the file
    assert recorded["memory"]["mem_hidden"] == 8
    (tmp_path / "typo.json").write_text('{"segment_lenght": 8}')
    _error(capsys, _absorb(workdir, tmp_path, "--config", str(tmp_path / "typo.json")),
           "usage", "unknown LiftConfig fields ['segment_lenght']")


def test_demo_model_missing_is_a_clear_model_error(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lift_kernels.demo_model", None)  # import fails
    _error(capsys, _absorb(workdir, tmp_path, model="demo"), "model",
           "embedded demo model (lift_kernels.demo_model.load_demo_model) is not available")


def test_recipe_then_config_file_then_options(workdir, tmp_path, capsys):
    from safetensors import safe_open

    from lift_kernels.lift import RECIPES

    (tmp_path / "over.json").write_text(json.dumps({
        "select_line_nats": None, "select_token_nats": 1.0, "lr": 0.2,
        "memory": {"gate_shift": 0.5}, "plain_lines": 2, "kl_weight": 0.5, "kl_texts": 2,
        "kl_tokens": 8}))
    rc = main(["absorb", "--model", str(workdir / "model"), "--document",
               str(workdir / "doc.txt"), "--out", str(tmp_path / "m.safetensors"), "--json",
               "--recipe", "demo", "--config", str(tmp_path / "over.json"), "--epochs", "2",
               "--backend", "torch"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["lift.config"])
    assert recorded == report["recipe"] and report["recipe_name"] == "demo"
    assert recorded["sample_unit"] == "line"                      # the preset
    assert recorded["lr"] == 0.2 and recorded["select_line_nats"] is None  # the file
    assert recorded["memory"]["gate_shift"] == 0.5                 # the file, inside memory
    assert recorded["memory"]["mem_hidden"] == RECIPES["demo"]["memory"]["mem_hidden"]
    assert recorded["segment_epochs"] == 2 and report["steps"] == 2  # the command line
    assert report["num_anchors"] == 2 and 0 < report["labelled_tokens"]
    with pytest.raises(SystemExit) as exit_:
        main(["absorb", "--model", str(workdir / "model"), "--document",
              str(workdir / "doc.txt"), "--out", str(tmp_path / "x"), "--recipe", "nope"])
    assert exit_.value.code == EXIT_CODES["usage"]
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_eval_reports_recall_loss_and_gates(workdir, tmp_path, capsys):
    (tmp_path / "unrelated.txt").write_text("the king and the queen .\n\nwhat is blue ?\n")
    args = ["eval", "--model", str(workdir / "model"), "--qa", str(workdir / "qa.json"),
            "--unrelated", str(tmp_path / "unrelated.txt"), "--match", "contains",
            "--max-new-tokens", "4", "--backend", "torch"]
    assert main([*args, "--memory", str(workdir / "memory.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_questions"] == 1 and 0.0 <= report["recall"] <= 1.0
    assert report["answers"][0]["question"] == "what is red ?"
    assert report["unrelated_loss_base"] != report["unrelated_loss_memory"]
    assert len(report["gate_answer"]) == 2 and len(report["gate_answer"][0]) == 4
    assert len(report["gate_unrelated_per_layer"]) == 2
    assert main(args) == 0  # no memory: the base alone, no gates
    text = capsys.readouterr().out
    assert "recall" in text and "mean gate" not in text
    _error(capsys, main([*args[:3], "--qa", str(tmp_path / "unrelated.txt")]), "qa", "QA")


@pytest.fixture(scope="module")
def many_dir(workdir, tmp_path_factory):
    """Three documents (one in a subfolder, another extension) absorbed together with
    --out-dir; returns (folder of the memories, the absorb report)."""
    root = tmp_path_factory.mktemp("many")
    (root / "sub").mkdir()
    (root / "out").mkdir()
    paths = [root / "a.txt", root / "b.txt", root / "sub" / "c.md"]
    for i, path in enumerate(paths):
        path.write_text(make_document(30 + 25 * i, seed=10 + i))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import io
        from contextlib import redirect_stdout

        buffer = io.StringIO()
        with redirect_stdout(buffer):
            rc = main(["absorb", "--model", str(workdir / "model"), "--document",
                       *map(str, paths), "--out-dir", str(root / "out"), "--json", *FAST])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return root / "out", json.loads(buffer.getvalue())


def test_absorb_out_dir_writes_one_memory_per_document(many_dir):
    out, report = many_dir
    assert sorted(os.listdir(out)) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    docs = report["documents"]
    assert [os.path.basename(d["out"]) for d in docs] == ["a.safetensors", "b.safetensors",
                                                          "c.safetensors"]
    assert docs[0]["document_tokens"] < docs[1]["document_tokens"] < docs[2]["document_tokens"]
    assert all(d["last_loss"] < d["first_loss"] for d in docs)
    assert report["tokens"] == sum(d["tokens"] for d in docs) and report["tokens_per_second"] > 0
    assert report["steps"] == max(d["steps"] for d in docs)


def test_ask_memories_answers_each_question_with_its_own_memory(workdir, many_dir, tmp_path,
                                                                capsys):
    out, _ = many_dir
    lines = [{"memory": "c", "question": "what is red ?"},
             {"memory": "a", "question": "who is the king ?", "note": "ignored"},
             {"memory": "c", "question": "where ?"}, {"memory": "b", "question": "what ?"}]
    (tmp_path / "q.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    rc = main(["ask", "--model", str(workdir / "model"), "--memories", str(out), "--questions",
               str(tmp_path / "q.jsonl"), "--max-new-tokens", "4", "--batch-size", "3",
               "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_questions"] == 4 and report["num_memories"] == 3
    assert [a["memory"] for a in report["answers"]] == ["c", "a", "c", "b"]
    for item in (report["answers"][0], report["answers"][1], report["answers"][3]):
        assert main(["ask", "--model", str(workdir / "model"), "--memory",
                     str(out / f"{item['memory']}.safetensors"), "--question", item["question"],
                     "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip() == item["answer"]
    assert main(["ask", "--model", str(workdir / "model"), "--memories", str(out),
                 "--questions", str(tmp_path / "q.jsonl"), "--max-new-tokens", "4"]) == 0
    rows = capsys.readouterr().out.strip().split("\n")
    assert [r.split("\t")[:2] for r in rows] == [[q["memory"], q["question"]] for q in lines]


def test_many_documents_and_memories_errors(workdir, many_dir, tmp_path, capsys):
    out, _ = many_dir
    doc = str(workdir / "doc.txt")
    model = ["--model", str(workdir / "model")]

    def absorb(*args):
        return main(["absorb", *model, "--quiet", *FAST, *args])

    for args in (["--document", doc, "--out", "x", "--out-dir", str(tmp_path)],
                 ["--document", doc]):
        with pytest.raises(SystemExit) as exit_:
            absorb(*args)
        assert exit_.value.code == EXIT_CODES["usage"]
    _error(capsys, absorb("--document", doc, doc, "--out", str(tmp_path / "m.st")), "usage",
           "give --out-dir")
    _error(capsys, absorb("--document", doc, "--out-dir", str(tmp_path / "nope")), "usage",
           "not an existing directory")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "doc.md").write_text("the king .")
    _error(capsys, absorb("--document", doc, str(tmp_path / "d" / "doc.md"), "--out-dir",
                          str(tmp_path)), "usage", "would both write the memory file doc")
    _error(capsys, absorb("--document", doc, str(tmp_path / "gone.txt"), "--out-dir",
                          str(tmp_path)), "document", "gone.txt' does not exist")
    _error(capsys, absorb("--document", doc, str(tmp_path / "d" / "e.md"), "--qa", "a.json",
                          "b.json", "c.json", "--out-dir", str(tmp_path)), "usage",
           "one QA file per document")

    def ask(*args):
        return main(["ask", *model, *args])

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"memory": "a", "question": "who ?"}\n')
    _error(capsys, ask("--memories", str(tmp_path / "none"), "--questions", str(questions)),
           "memory", "not an existing directory")
    _error(capsys, ask("--memories", str(out), "--questions", str(tmp_path / "none.jsonl")),
           "qa", "does not exist")
    (tmp_path / "bad.jsonl").write_text('{"memory": "a", "question": "who ?"}\n{"memory": \n')
    _error(capsys, ask("--memories", str(out), "--questions", str(tmp_path / "bad.jsonl")),
           "qa", "line 2 is not valid JSON")
    (tmp_path / "bad.jsonl").write_text('{"memory": "a"}\n')
    _error(capsys, ask("--memories", str(out), "--questions", str(tmp_path / "bad.jsonl")),
           "qa", 'line 1 needs a non-empty string "question"')
    (tmp_path / "bad.jsonl").write_text('{"memory": "a", "question": "who ?"}\n'
                                        '{"memory": "zz", "question": "who ?"}\n')
    _error(capsys, ask("--memories", str(out), "--questions", str(tmp_path / "bad.jsonl")),
           "memory", "asks memory 'zz', which")
    rc = ask("--memories", str(out), "--questions", str(tmp_path / "bad.jsonl"), "--json")
    report = json.loads(capsys.readouterr().out)
    assert rc == report["exit_code"] == EXIT_CODES["memory"] and "a, b, c" in report["message"]
    _error(capsys, ask("--memories", str(out), "--question", "who ?"), "usage",
           "--memories DIR goes with --questions")
    _error(capsys, ask("--memory", str(out / "a.safetensors"), "--questions", str(questions)),
           "usage", "--memories DIR goes with --questions")
    _error(capsys, ask("--memories", str(out), "--questions", str(questions), "--document",
                       doc), "usage", "--document goes with --memory")
    with pytest.raises(SystemExit) as exit_:
        ask("--memory", str(out / "a.safetensors"), "--memories", str(out), "--question", "q")
    assert exit_.value.code == EXIT_CODES["usage"]


def test_help_imports_neither_torch_nor_transformers():
    """`lift-kernels --help` and `absorb --help` answer without the heavy imports (they
    used to take seconds)."""
    code = ("import sys\nfrom lift_kernels.cli import main\n"
            "for argv in (['--help'], ['absorb', '--help'], ['ask', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--out-dir" in run.stdout and "--questions" in run.stdout
