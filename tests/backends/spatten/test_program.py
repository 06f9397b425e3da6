"""The program format: RTL CSV columns, JSON and CSV round trips, validation, query rows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pcc.backends.spatten import CSV_COLUMNS, Program, program_from_schedule

# Rows of the RTL's GPT-2-small trace (mit-han-lab/spatten, MIT licence:
# hardware/workloads/summary-gpt2-small-wikitext2-per8.csv), its dense twin, and its closing config row.
RTL_HEADER = (
    "iteration_id,layer_id,head_id,embedding_length_D,sentence_length_L,key_fetch_num,quant_key_bit,"
    "quant_query_bit,auto_requant_thres,if_requant,auto_requant_incre,value_fetch_num,quant_value_bit,"
    "if_accumulate_importance,if_rescale_previous_importance,if_topk,topk\n"
)
RTL_ROWS = (
    "0,0,0,64.0,993,993,6,16,0.05,True,4,204,6,True,False,False,-1\n"
    "1,0,4,64.0,994,921,6,16,0.05,True,4,184,6,True,False,False,-1\n"
    "1,11,1,64.0,994,102,6,16,0.05,False,4,20,6,True,False,False,-1\n"
    "2,0,0,64.0,995,995,-1,-1,-1,False,-1,995,-1,False,False,False,-1\n"
)
RTL_TRAILER = "configs/gpt2/wikitext2/gpt2_pp11+consider1000.yml,,,,,,,,,,,,,,,,\n"


def gpt2_program(prompt_stage: bool) -> Program:
    return program_from_schedule("gpt2", 4, 3, 64, 60, [1.0, 0.8, 0.5, 0.5], [1.0, 1.0, 2 / 3, 2 / 3], 0.25, 6, 4,
                                 0.3, 0.05, 4, prompt_stage=prompt_stage, name="tiny")


def test_csv_columns_are_the_rtl_testbench_columns():
    assert ",".join(CSV_COLUMNS) + "\n" == RTL_HEADER
    assert gpt2_program(False).to_csv().splitlines()[0] + "\n" == RTL_HEADER


def test_rtl_trace_reads_and_writes_back_byte_for_byte():
    program = Program.from_csv(RTL_HEADER + RTL_ROWS + RTL_TRAILER, mode="gpt2", layers=12, heads=12)
    assert len(program.requests) == 4 and program.head_dim == 64
    first, _, third, dense = program.requests
    assert (first.key_fetch_num, first.value_fetch_num, first.quant_key_bit) == (993, 204, 6)
    assert first.auto_requant_thres == 0.05
    assert first.requant_fraction == 1.0 and third.requant_fraction == 0.0  # the RTL's flag is the outcome
    assert dense.quant_key_bit == -1 and dense.key_fetch_num == dense.sentence_length_L
    assert program.to_csv() == RTL_HEADER + RTL_ROWS  # the config row is not a request


def test_json_round_trip_is_exact():
    for program in (gpt2_program(True), gpt2_program(False)):
        program.metadata["source"] = "unit test"
        again = Program.from_json(program.to_json())
        assert again == program
        assert any(0 < r.requant_fraction < 1 for r in again.requests) == program.prompt_stage


def test_csv_round_trip_is_exact_for_rtl_columns():
    program = gpt2_program(True)
    text = program.to_csv()
    again = Program.from_csv(text, mode="gpt2", prompt_stage=True, name="tiny")
    assert again.to_csv() == text
    # One-query requests carry their outcome in if_requant, so they come back whole; the prompt stage's
    # row fraction (0.3) is JSON only.
    generation = [r for r in program.requests if r.iteration_id > 0]
    assert [r for r in again.requests if r.iteration_id > 0] == generation
    assert {r.requant_fraction for r in again.requests if r.iteration_id == 0} == {1.0}
    assert Program.from_csv(gpt2_program(False).to_csv(), mode="gpt2", name="tiny") == gpt2_program(False)


def test_query_rows_follow_the_mode():
    program = gpt2_program(True)
    rows = program.query_rows()
    keys = program.column("key_fetch_num")
    prompt = program.column("iteration_id") == 0
    assert (rows[prompt] == keys[prompt]).all() and (rows[~prompt] == 1).all()
    bert = program_from_schedule("bert", 2, 2, 64, 100, [1.0, 0.5], [1.0, 1.0])
    assert list(bert.query_rows()) == [100, 100, 50, 50]


def test_invalid_requests_and_csv_are_refused():
    request = gpt2_program(False).requests[0]
    with pytest.raises(ValueError, match="key_fetch_num"):
        replace(request, key_fetch_num=request.sentence_length_L + 1)
    with pytest.raises(ValueError, match="requant_fraction"):
        replace(request, if_requant=False, requant_fraction=0.5)
    with pytest.raises(ValueError, match="header"):
        Program.from_csv(RTL_HEADER.replace("topk\n", "k\n") + RTL_ROWS, mode="gpt2")
    with pytest.raises(ValueError, match="line 2"):
        Program.from_csv(RTL_HEADER + RTL_ROWS.replace("True", "yes", 1), mode="gpt2")
    with pytest.raises(ValueError, match="outside the model"):
        Program.from_csv(RTL_HEADER + RTL_ROWS, mode="gpt2", layers=4)
