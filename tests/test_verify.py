"""`tpserve verify` through the real CLI entry: passes on GPTQModel fixtures at tp 2/3/4 (in-process
and over Ray), catches and localises a shard whose group offset was dropped, prints parseable JSON.

The pass/fail threshold is verify's own (float32: 1e-4 of max |logit|, where tp=N vs tp=1 differ by
~5e-7 and a dropped group offset by >4e-2 on these fixtures); these tests check that it lands on
the right side of it and that the report says where.
"""

import json

import pytest
import torch

import tpserve
from tpserve.cli import main
from tpserve.model.gptq_shard import BREAK_GROUP_OFFSET_ENV
from tpserve.verify import verify_llm

from test_peer_fixtures import FIXTURES


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["verify", *map(str, argv)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name, tp", [("llama_g128_sym", 2), ("mistral_v2_asym_g128", 3)])
def test_passes_in_process(capsys, name, tp):
    code, out = run_cli(capsys, "--model", FIXTURES / name, "--tp", tp, "--backend", "local",
                        "--max-tokens", 8)
    assert code == 0, out
    assert out.startswith("PASS") and "tolerance: max |logit diff| <= 1.0e-04" in out
    assert "why: float32 on both sides" in out and out.count("8/8 equal") == 3


def test_passes_over_ray_at_tp4_with_straddling_shards_and_json_holds_the_figures(ray_cluster,
                                                                                   capsys):
    # llama_g128_sym at tp=4: o_proj (K=192) splits at 48/96/144 and down_proj (K=688) at
    # 168/344/512, inside groups of 128.
    code, out = run_cli(capsys, "--model", FIXTURES / "llama_g128_sym", "--tp", 4, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["passed"] and report["tp"] == 4 and report["backend"] == "ray"
    assert report["reference"].startswith("tp=1") and report["localisation"] is None
    assert report["tolerance"]["rel"] == 1e-4 and "float32" in report["tolerance"]["reason"]
    assert len(report["prompts"]) == 3
    for p in report["prompts"]:
        assert 0 <= p["max_rel"] < 1e-5 and 0 <= p["max_abs"] < 1e-5
        assert p["top1_agree"] == p["top5_agree"] == 1.0
        assert p["greedy_equal"] and p["greedy"] == p["greedy_reference"] and len(p["greedy"]) == 16


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_dropped_group_offset_is_caught_and_localised(monkeypatch, capsys, request, tmp_path,
                                                        backend):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")  # actors made after setenv inherit TPSERVE_*
    monkeypatch.setenv(BREAK_GROUP_OFFSET_ENV, "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("[1, 17, 42, 99, 3, 250, 128, 64, 7, 200, 33, 5]\n")
    code, out = run_cli(capsys, "--model", FIXTURES / "llama_g128_sym", "--tp", 4, "--backend",
                        backend, "--prompts", prompts, "--max-tokens", 4, "--json")
    assert code == 1, out
    report = json.loads(out)
    assert not report["passed"] and max(p["max_rel"] for p in report["prompts"]) > 1e-2
    loc = report["localisation"]
    assert loc["layer"] == 0
    found = {(s["rank"], s["weight"]) for s in loc["shards"]}
    # Only shards whose offset moves a row into another group go wrong: rank 2's o_proj rows
    # [96, 144) cross group 1 at 128; down_proj rows [168, 344) and [344, 512) cross 256 and 384.
    assert found == {(2, "self_attn.o_proj"), (1, "mlp.down_proj"), (2, "mlp.down_proj")}
    for s in loc["shards"]:
        assert s["group_offset"] == 0 and s["expected_group_offset"] == s["rows"][0] % 128 != 0
    assert loc["rank"] in (1, 2) and loc["weight"] in ("self_attn.o_proj", "mlp.down_proj")


def test_the_human_report_names_the_layer_rank_weight_and_shard(monkeypatch, capsys):
    monkeypatch.setenv(BREAK_GROUP_OFFSET_ENV, "1")
    code, out = run_cli(capsys, "--model", FIXTURES / "mistral_v2_asym_g128", "--tp", 3,
                        "--backend", "local", "--max-tokens", 4)
    assert code == 1 and out.startswith("FAIL"), out
    assert "layer 0 is the first whose output differs" in out
    # o_proj's shards (rows 64 and 128 of K=192) stay inside their groups; down_proj's do not.
    assert "rank 1 mlp.down_proj: rows [224, 456) cols [0, 256) group_offset 0 (expected 96)" in out
    assert "o_proj" not in out


def test_transformers_reference_passes(capsys):
    code, out = run_cli(capsys, "--model", FIXTURES / "qwen3_8bit_g64", "--tp", 3,
                        "--backend", "local", "--reference", "transformers", "--max-tokens", 8)
    assert code == 0, out
    assert "vs transformers" in out


def test_prompts_file_of_text_and_ids(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("[1, 17, 42, 99, 3, 250]\n\nHello world\n[5, 6, 7]\n")
    code, out = run_cli(capsys, "--model", FIXTURES / "llama_g128_sym", "--tp", 2, "--backend",
                        "local", "--prompts", prompts, "--max-tokens", 4, "--json")
    report = json.loads(out)
    assert code == 0 and report["prompts_from"] == f"3 from {prompts}"
    assert [p["tokens"] for p in report["prompts"]][::2] == [6, 3]
    assert all(len(p["greedy"]) == 4 for p in report["prompts"])


@pytest.mark.parametrize("argv, words", [
    (["--tp", 5], "not divisible by tp=5"),
    (["--tp", 2, "--prompts", "/nonexistent/prompts.txt"], "cannot be read"),
    (["--tp", 2, "--prompts", "{bad}"], "not a JSON list of token ids"),
])
def test_user_errors_exit_2_with_one_sentence(tmp_path, capsys, caplog, argv, words):
    if "{bad}" in argv:
        bad = tmp_path / "bad.txt"
        bad.write_text("[1, 2.5]\n")
        argv = [bad if a == "{bad}" else a for a in argv]
    code, _ = run_cli(capsys, "--model", FIXTURES / "llama_g128_sym", "--backend", "local", *argv)
    assert code == 2 and words in caplog.text


def test_verify_llm_checks_an_already_loaded_llm_without_closing_it():
    # What `tpserve launch --verify` calls before it accepts requests.
    llm = tpserve.load(FIXTURES / "llama_g128_sym", tp=4, dtype=torch.float16)
    report = verify_llm(llm, FIXTURES / "llama_g128_sym", prompts=[[1, 17, 42, 99, 3]],
                        max_tokens=4)
    assert report.passed and report.dtype == "float16", report.format()
    assert report.tolerance["rel"] == 4 * torch.finfo(torch.float16).eps
    assert llm.generate([1, 17], max_tokens=2, ignore_eos=True)  # still usable
    llm.close()
