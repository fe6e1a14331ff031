"""Evaluation data: kit JSON lines and CSV, eval types, and one-line DataErrors naming file and line/row."""
import json
import os

import pytest

from llm_merging import data
from llm_merging.model import tiny
from llm_merging.data import Dataset, load_examples
from llm_merging.core.errors import ConfigError, DataError

KIT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "shared", "data", "starter_kit")


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _error(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_examples(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# ------------------------------------------------------------------------------------------- formats

def test_json_lines_rows_and_inferred_eval_types(tmp_path):
    p = _write(tmp_path / "mix.json", "\n".join([
        json.dumps({"input": "Q1", "target": "B", "answer_choices": ["A", "B"], "label": 1}),
        "",
        json.dumps({"input": "Q2", "target": "B", "answer_choices": ["A", "B", "C"]}),  # label from the target text
        json.dumps({"input": "Summarise", "target": "A summary."}),
    ]) + "\n")
    rows = load_examples(p)
    assert [r["eval_type"] for r in rows] == ["multiple_choice", "multiple_choice", "generation"]
    assert rows[0]["label"] == 1 and rows[1]["label"] == 1 and "label" not in rows[2]
    assert "answer_choices" not in rows[2] and rows[2]["target"] == "A summary."


def test_json_array_file_is_accepted(tmp_path):
    p = _write(tmp_path / "arr.json", json.dumps([{"input": "x", "target": "y"}, {"input": "z"}]))
    assert [r["input"] for r in load_examples(p)] == ["x", "z"]


def test_kit_csv_rows(tmp_path):
    p = _write(tmp_path / "val.csv",
               'id,input,target,answer_choices,eval_type\n'
               '7,"Question: multi\nline?",1,"[\'A\', \'B\', \'C\']",multiple_choice\n'
               '8,Summarise this,A summary.,None,generation\n'
               '9,Infer me,,"[""x"", ""y""]",\n'
               '10,Plain,,,\n')
    rows = load_examples(p)
    assert [r["id"] for r in rows] == ["7", "8", "9", "10"]
    assert rows[0]["input"] == "Question: multi\nline?" and rows[0]["answer_choices"] == ["A", "B", "C"]
    assert rows[0]["label"] == 1  # kit CSV: the target of a choice row is the choice index
    assert rows[1]["eval_type"] == "generation" and "answer_choices" not in rows[1]
    assert rows[2]["eval_type"] == "multiple_choice" and "target" not in rows[2] and "label" not in rows[2]
    assert rows[3]["eval_type"] == "generation"


def test_eval_type_argument_overrides_rows_and_max_examples(tmp_path):
    p = _write(tmp_path / "mc.json", "".join(
        json.dumps({"input": f"q{i}", "answer_choices": ["a", "b"], "label": 0}) + "\n" for i in range(5)))
    rows = load_examples(p, eval_type="generation", max_examples=3)
    assert len(rows) == 3 and {r["eval_type"] for r in rows} == {"generation"}
    assert len(load_examples(p, max_examples=0)) == 0
    with pytest.raises(ConfigError):
        load_examples(p, eval_type="classification")


def test_dataset_class_is_kit_compatible():
    path = tiny.sample_data_files()[0]
    ds = Dataset(path)
    assert len(ds) == len(load_examples(path)) and ds[0]["input"] and list(ds)[0] == ds[0]
    assert ds.dataset_filepath == path


def test_records_and_hf_datasets(monkeypatch):
    rows = data.examples_from_records([{"question": "q", "answer": "a"}], field_map={"question": "input", "answer": "target"})
    assert rows == [{"input": "q", "target": "a", "eval_type": "generation"}]
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"input": "q", "answer_choices": ["a", "b"], "label": 1}])
    assert data.examples_from_records(ds, "mem")[0]["label"] == 1

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\n(offline mode)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_examples("hf:someone/cosmos_qa@validation")
    assert "\n" not in str(info.value) and "hf:someone/cosmos_qa@validation" in str(info.value)


# -------------------------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "nope.json")


@pytest.mark.parametrize("name,text", [("e.json", ""), ("w.json", "  \n\n"), ("e.csv", ""), ("h.csv", "id,input,eval_type\n")])
def test_empty_file(tmp_path, name, text):
    assert "empty" in _error(_write(tmp_path / name, text))


def test_malformed_json_line_names_line(tmp_path):
    p = _write(tmp_path / "bad.json", '{"input": "a"}\n{"input": "b"}\n\n{"input": oops}\n')
    assert "line 4" in _error(p) and "malformed JSON" in _error(p)


def test_json_line_not_an_object_or_without_input(tmp_path):
    assert "line 1" in _error(_write(tmp_path / "str.json", '"text"\n'))
    assert "line 2: missing 'input'" in _error(_write(tmp_path / "noinput.json", '{"input": "a"}\n{"target": "b"}\n'))


def test_csv_without_input_column(tmp_path):
    assert "no 'input' column" in _error(_write(tmp_path / "x.csv", "id,question\n1,hello\n"))


def test_unparsable_answer_choices_names_row(tmp_path):
    p = _write(tmp_path / "x.csv", "id,input,answer_choices\n1,ok,\"['a', 'b']\"\n2,bad,\"['a', 'b'\"\n")
    msg = _error(p)
    assert "row 2" in msg and "answer_choices" in msg
    p = _write(tmp_path / "y.json", json.dumps({"input": "q", "answer_choices": "[unclosed"}) + "\n")
    assert "line 1" in _error(p)
    p = _write(tmp_path / "z.json", json.dumps({"input": "q", "answer_choices": {"a": 1}}) + "\n")
    assert "line 1" in _error(p)


def test_label_out_of_range_names_row(tmp_path):
    p = _write(tmp_path / "x.json", json.dumps({"input": "q", "answer_choices": ["a", "b"], "label": 0}) + "\n"
               + json.dumps({"input": "q", "answer_choices": ["a", "b"], "label": 2}) + "\n")
    msg = _error(p)
    assert "line 2" in msg and "label 2 out of range" in msg
    p = _write(tmp_path / "v.csv", "id,input,target,answer_choices\n1,q,5,\"['a', 'b']\"\n")
    assert "row 1" in _error(p) and "out of range" in _error(p)
    p = _write(tmp_path / "n.json", json.dumps({"input": "q", "answer_choices": ["a"], "label": "first"}) + "\n")
    assert "label must be an integer" in _error(p)


def test_unknown_eval_type_names_row(tmp_path):
    p = _write(tmp_path / "x.csv", "id,input,eval_type\n1,q,generation\n2,q,classification\n")
    msg = _error(p)
    assert "row 2" in msg and "classification" in msg


def test_multiple_choice_without_choices_and_duplicate_ids(tmp_path):
    p = _write(tmp_path / "x.csv", "id,input,eval_type,answer_choices\n1,q,multiple_choice,\n")
    assert "row 1" in _error(p) and "no answer_choices" in _error(p)
    p = _write(tmp_path / "d.csv", "id,input\n1,a\n2,b\n1,c\n")
    assert "row 3" in _error(p) and "duplicate id" in _error(p)


def test_malformed_csv_row_width(tmp_path):
    p = _write(tmp_path / "x.csv", "id,input\n1,a\n2,b,extra,fields\n")
    assert "row 2" in _error(p)


# ---------------------------------------------------------------------------------------- kit files

def test_sample_data_files_load():
    cosmos, xsum, test = (load_examples(p) for p in tiny.sample_data_files())
    assert all(r["eval_type"] == "multiple_choice" and "label" in r for r in cosmos)
    assert all(r["eval_type"] == "generation" and r["target"] for r in xsum)
    assert {len(r.get("answer_choices", [])) for r in test} == {0, 2, 4, 8}


@pytest.mark.skipif(not os.path.isdir(KIT), reason="starter-kit data not available")
def test_starter_kit_files_load():
    cosmos = load_examples(os.path.join(KIT, "cosmos_qa.json"))
    assert len(cosmos) == 500 and all(r["eval_type"] == "multiple_choice" and 0 <= r["label"] < 4 for r in cosmos)
    assert all(r["answer_choices"][r["label"]] == r["target"] for r in cosmos)
    xsum = load_examples(os.path.join(KIT, "xsum.json"))
    assert len(xsum) == 200 and all(r["eval_type"] == "generation" and r["target"] for r in xsum)
    vcosmos = load_examples(os.path.join(KIT, "validation", "cosmos_qa.csv"))
    assert [r["label"] for r in vcosmos] == [r["label"] for r in cosmos]
    vxsum = load_examples(os.path.join(KIT, "validation", "xsum.csv"))
    assert [r["target"] for r in vxsum] == [r["target"] for r in xsum]
    test = load_examples(os.path.join(KIT, "test.csv"))
    assert len(test) == 807 and len({r["id"] for r in test}) == 807
    assert all("target" not in r and "label" not in r for r in test)
    assert {len(r["answer_choices"]) for r in test if r["eval_type"] == "multiple_choice"} == {2, 4, 8}
