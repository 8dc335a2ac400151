"""Labels and config of the evaluation job, pure and fast: LabelSpec (vocabulary, mapping, uncertain policy,
CheXpert preset) and the strict EvalConfig (unknown keys, choices, fractions, content hash)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl_scale.config import ConfigError
from medssl_scale.finetune.config import EvalConfig, TaskConfig, load_eval_config
from medssl_scale.finetune.labels import CHEXPERT_CONDITIONS, label_spec

URL = "mem://shards"
HAM = {"dx": {"vocabulary": ["nv", "mel", "bkl", "bcc", "akiec"], "counts": {}, "missing": 0}}
CHEX_VALUES = {"vocabulary": ["-1.0", "0.0", "1.0"], "missing": 3}
CHEX = {c: dict(CHEX_VALUES) for c in CHEXPERT_CONDITIONS} | {"Sex": {"vocabulary": ["F", "M"]}}


def _nan_equal(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32), equal_nan=True)


# ---- multiclass -----------------------------------------------------------------------------------------

def test_multiclass_vocabulary_sorted_and_encoded():
    spec = label_spec(TaskConfig(column="dx"), HAM, URL)
    assert spec.task == "multiclass" and spec.columns == ["dx"]
    assert spec.names == ["akiec", "bcc", "bkl", "mel", "nv"]
    assert [spec.encode({"dx": v}) for v in ("akiec", "nv", "mel")] == [0, 4, 3]
    assert spec.encode({}) is None and spec.encode({"dx": None}) is None  # blank / missing: left out
    assert spec.as_dict() == {"task": "multiclass", "names": spec.names, "columns": ["dx"], "mapping": None}


def test_multiclass_mapping_merges_and_drops():
    task = TaskConfig(column="dx", mapping={"akiec": "malignant", "bcc": "malignant", "mel": "malignant",
                                            "bkl": "benign", "nv": None})
    spec = label_spec(task, HAM, URL)
    assert spec.names == ["benign", "malignant"]
    assert spec.encode({"dx": "bcc"}) == spec.encode({"dx": "mel"}) == 1
    assert spec.encode({"dx": "bkl"}) == 0
    assert spec.encode({"dx": "nv"}) is None  # dropped (null)
    # Values the mapping does not name keep their own class, sorted with the new names.
    spec = label_spec(TaskConfig(column="dx", mapping={"akiec": "bcc", "nv": None}), HAM, URL)
    assert spec.names == ["bcc", "bkl", "mel"]
    assert spec.encode({"dx": "akiec"}) == spec.encode({"dx": "bcc"}) == 0 and spec.encode({"dx": "nv"}) is None


def test_multiclass_unknown_mapping_key_rejected():
    with pytest.raises(ConfigError, match=r"task\.mapping names \['melanoma'\]") as e:
        label_spec(TaskConfig(column="dx", mapping={"melanoma": "mel"}), HAM, URL)
    assert "akiec" in str(e.value)  # the real values are listed


def test_multiclass_mapping_numeric_keys_from_yaml():
    """A 0/1/2 column mapped in YAML (`task.mapping={0: null, 1: pos}`): YAML reads the keys as integers, the
    shards hold strings; the keys name values all the same (also when mixed with string keys)."""
    manifest = {"grade": {"vocabulary": ["0", "1", "2"]}}
    cfg = load_eval_config(None, ["task.column=grade", "task.mapping={0: null, 1: pos, '2': high}"])
    spec = label_spec(cfg.task, manifest, URL)
    assert spec.names == ["high", "pos"]
    assert spec.encode({"grade": "0"}) is None and spec.encode({"grade": "1"}) == 1 and spec.encode({"grade": "2"}) == 0
    with pytest.raises(ConfigError, match=r"task\.mapping names \['7'\]"):
        label_spec(load_eval_config(None, ["task.column=grade", "task.mapping={7: x, '1': y}"]).task, manifest, URL)


def test_multiclass_mapping_leaving_one_class_rejected():
    with pytest.raises(ConfigError, match="at least 2"):
        label_spec(TaskConfig(column="dx", mapping={v: "all" for v in HAM["dx"]["vocabulary"]}), HAM, URL)


def test_absent_label_column_names_the_key_and_the_columns():
    with pytest.raises(ConfigError) as e:
        label_spec(TaskConfig(column="diagnosis"), HAM, URL)
    msg = str(e.value)
    assert "'diagnosis'" in msg and "dx" in msg and "task.column" in msg and URL in msg
    with pytest.raises(ConfigError, match="--label-cols"):
        label_spec(TaskConfig(column="dx"), {}, URL)


def test_saved_model_classes_reject_stray_values_unless_mapped():
    classes = ["bcc", "mel", "nv"]
    with pytest.raises(ConfigError) as e:
        label_spec(TaskConfig(column="dx"), HAM, URL, classes=classes)
    assert "['akiec', 'bkl']" in str(e.value) and "task.mapping" in str(e.value)
    with pytest.raises(ConfigError, match=r"\['bkl'\]"):
        label_spec(TaskConfig(column="dx", mapping={"akiec": "bcc"}), HAM, URL, classes=classes)
    spec = label_spec(TaskConfig(column="dx", mapping={"akiec": "bcc", "bkl": None}), HAM, URL, classes=classes)
    assert spec.names == classes  # the model's classes and order, not the data's
    assert spec.encode({"dx": "akiec"}) == 0 and spec.encode({"dx": "nv"}) == 2 and spec.encode({"dx": "bkl"}) is None
    # Data holding only some of the model's classes is fine (out-of-distribution shards).
    spec = label_spec(TaskConfig(column="dx"), {"dx": {"vocabulary": ["nv"]}}, URL, classes=classes)
    assert spec.names == classes and spec.encode({"dx": "nv"}) == 2


def test_multiclass_with_chexpert_preset_rejected():
    with pytest.raises(ConfigError, match="task.type=multilabel"):
        label_spec(TaskConfig(column="dx", preset="chexpert"), HAM, URL)


# ---- multilabel -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("uncertain, as_value", [("ignore", math.nan), ("zeros", 0.0), ("ones", 1.0)])
def test_multilabel_encodings(uncertain, as_value):
    cols = ["Edema", "Atelectasis", "Cardiomegaly"]
    spec = label_spec(TaskConfig(type="multilabel", columns=cols, uncertain=uncertain), CHEX, URL)
    assert spec.task == "multilabel" and spec.names == cols and spec.columns == cols  # the order given
    got = spec.encode({"Edema": "1.0", "Atelectasis": "0.0", "Cardiomegaly": "-1.0"})
    assert got.dtype == np.float32 and _nan_equal(got, [1.0, 0.0, as_value])
    # The default spellings of positive / negative / uncertain, case and blanks around them ignored.
    assert _nan_equal(spec.encode({"Edema": " Yes ", "Atelectasis": "negative", "Cardiomegaly": "Uncertain"}),
                      [1.0, 0.0, as_value])
    assert _nan_equal(spec.encode({"Edema": "1", "Atelectasis": "0", "Cardiomegaly": "-1"}), [1.0, 0.0, as_value])
    # Blanks (None in the shards) and absent columns are missing: NaN.
    assert _nan_equal(spec.encode({"Edema": None, "Atelectasis": "1.0"}), [math.nan, 1.0, math.nan])
    # An image with no known label is left out; with zeros / ones an uncertain one is a label.
    only_uncertain = spec.encode({"Edema": None, "Atelectasis": None, "Cardiomegaly": "-1.0"})
    if uncertain == "ignore":
        assert only_uncertain is None
    else:
        assert _nan_equal(only_uncertain, [math.nan, math.nan, as_value])
    assert spec.encode({"Edema": None, "Atelectasis": None, "Cardiomegaly": None}) is None
    assert spec.encode({}) is None


def test_chexpert_preset_five_conditions_in_order():
    spec = label_spec(TaskConfig(type="multilabel", preset="chexpert"), CHEX, URL)
    assert spec.names == spec.columns == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                          "Pleural Effusion"]
    row = {"Atelectasis": "1.0", "Cardiomegaly": "0.0", "Consolidation": "-1.0", "Edema": None,
           "Pleural Effusion": "1.0", "Sex": "F"}
    assert _nan_equal(spec.encode(row), [1.0, 0.0, math.nan, math.nan, 1.0])
    # The preset from the shipped config gives the same labels.
    cfg = load_eval_config("configs/cxr_multilabel.yaml", [])
    assert label_spec(cfg.task, CHEX, URL).names == spec.names
    # Explicit columns win over the preset.
    assert label_spec(TaskConfig(type="multilabel", preset="chexpert", columns=["Edema"]), CHEX, URL).names == ["Edema"]


def test_chexpert_preset_on_shards_missing_a_condition():
    partial = {c: v for c, v in CHEX.items() if c != "Edema"}
    with pytest.raises(ConfigError, match="'Edema'.*task.column"):
        label_spec(TaskConfig(type="multilabel", preset="chexpert"), partial, URL)


def test_multilabel_on_single_label_column_rejected():
    with pytest.raises(ConfigError) as e:
        label_spec(TaskConfig(type="multilabel", columns=["dx"]), HAM, URL)
    msg = str(e.value)
    assert "'dx'" in msg and "task.type=multiclass" in msg and "akiec" in msg
    # ... unless its values are declared positive / negative.
    task = TaskConfig(type="multilabel", columns=["Sex"], positive=["F"], negative=["M"])
    spec = label_spec(task, CHEX, URL)
    assert _nan_equal(spec.encode({"Sex": "f"}), [1.0]) and _nan_equal(spec.encode({"Sex": "M"}), [0.0])


def test_multilabel_needs_columns_and_no_mapping():
    with pytest.raises(ConfigError, match="task.columns"):
        label_spec(TaskConfig(type="multilabel"), CHEX, URL)
    with pytest.raises(ConfigError, match="task.mapping"):
        label_spec(TaskConfig(type="multilabel", preset="chexpert", mapping={"1.0": "x"}), CHEX, URL)


def test_multilabel_saved_model_labels_must_match():
    task = TaskConfig(type="multilabel", preset="chexpert")
    assert label_spec(task, CHEX, URL, classes=list(CHEXPERT_CONDITIONS)).names == list(CHEXPERT_CONDITIONS)
    with pytest.raises(ConfigError, match="list the same labels"):
        label_spec(task, CHEX, URL, classes=["Edema", "Atelectasis"])


# ---- config strictness ----------------------------------------------------------------------------------

def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match="protocol") as e:
        load_eval_config(None, ["protocl=linear"])
    assert "'protocl'" in str(e.value) and "did you mean 'protocol'" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'data.workers'"):
        load_eval_config(None, ["data.workerz=1"])


@pytest.mark.parametrize("override, key", [("protocol=lin", "protocol"), ("task.type=multi", "task.type"),
                                           ("task.uncertain=maybe", "task.uncertain"),
                                           ("task.preset=mimic", "task.preset"), ("model.depth=20", "model.depth")])
def test_bad_choice_names_the_key_and_the_choices(override, key):
    with pytest.raises(ConfigError) as e:
        load_eval_config(None, [override])
    assert str(e.value).startswith(f"{key}: ") and "is not one of" in str(e.value)


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5"])
def test_label_fraction_out_of_range(value):
    with pytest.raises(ConfigError, match=r"label_fraction=.*\(0, 1\]"):
        load_eval_config(None, [f"label_fraction={value}"])


def test_label_fraction_bounds_and_exclusive_with_labels_per_class():
    assert load_eval_config(None, ["label_fraction=1"]).label_fraction == 1.0
    assert load_eval_config(None, ["label_fraction=0.01"]).label_fraction == 0.01
    with pytest.raises(ConfigError, match="label_fraction and labels_per_class"):
        load_eval_config(None, ["label_fraction=0.1", "labels_per_class=5"])
    with pytest.raises(ConfigError, match="labels_per_class=0"):
        load_eval_config(None, ["labels_per_class=0"])


@pytest.mark.parametrize("override, key", [("preprocess.size=0", "preprocess.size"),
                                           ("preprocess.size=-5", "preprocess.size"),
                                           ("model.width=0", "model.width")])
def test_sizes_below_one_rejected_not_defaulted(override, key):
    """0 must not silently mean null (224 px / width 1), a negative size must not reach the model."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_eval_config(None, [override])


def test_shipped_configs_load():
    for name, protocol, task in (("ham_linear", "linear", "multiclass"), ("ham_finetune", "finetune", "multiclass"),
                                 ("cxr_multilabel", "finetune", "multilabel")):
        cfg = load_eval_config(f"configs/{name}.yaml", [])
        assert cfg.protocol == protocol and cfg.task.type == task


def test_content_hash_ignores_where_and_decode_speed_not_what():
    base = load_eval_config("configs/ham_linear.yaml", [])
    h = base.content_hash()
    assert h == EvalConfig(**{**base.__dict__}).content_hash()
    same = load_eval_config("configs/ham_linear.yaml", ["run_dir=/elsewhere/run", "feature_cache=/scratch/cache",
                                                        "data.workers=9"])
    assert same.content_hash() == h
    for override in ("label_fraction=0.1", "label_fraction=0.2", "seed=1", "protocol=knn",
                     "task.column=other", "encoder=x/encoder.pt"):
        assert load_eval_config("configs/ham_linear.yaml", [override]).content_hash() != h, override
    assert (load_eval_config(None, ["label_fraction=0.1"]).content_hash()
            != load_eval_config(None, ["label_fraction=0.2"]).content_hash())
