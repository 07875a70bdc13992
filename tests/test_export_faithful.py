"""`llada-convert to-hf` writes what the model is: an ARM as a Llama folder that transformers'
LlamaForCausalLM loads with our logits (checked against transformers itself, CPU float32), an MDM
or block model as a LLaDA folder that records its objective, block size and logit alignment; every
workdir reads back (from-hf, --checkpoint=HF_DIR) as the same model with the same logits, and what
cannot be read or written faithfully is refused in one line."""

import json

import jax
import numpy as np
import pytest

from conftest import make_tiny_config, write_workdir
from llada_jax.diffusion.alignment import resolve
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.interop import safetensors_io
from llada_jax.interop.workdir import from_hf, to_hf
from llada_jax.loading import load_model
from llada_jax.model import ModelConfig, logits
from llada_jax.model.forward import head_logits, two_stream_hidden
from test_llama_import import (
    IDS,
    VOCAB,
    llama_config_json,
    llama_tensors,
    numpy_llama,
    write_llama,
    write_tokenizer,
)

MODEL_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "mlp_hidden_size",
    "max_sequence_length",
    "rope_theta",
    "rms_norm_eps",
    "causal",
)


def shaping(config) -> dict:
  """What makes the model this model: sizes, attention, objective, block size, resolved logit
  alignment, token ids and vocabulary."""
  return {
      "model": {k: config.model[k] for k in MODEL_FIELDS},
      "objective": config.diffusion.objective,
      "block_size": config.diffusion.block_size if config.diffusion.objective == "block" else None,
      "logit_alignment": resolve(config),
      "tokens": config.tokens.to_dict(),
      "vocabulary": config.data.vocabulary,
  }


def model_logits(config, params, ids) -> np.ndarray:
  """float32 logits [B, L, V] of the network as its objective runs it: causal (ARM),
  bidirectional (MDM) or, for a block model, the two-stream pass over the clean sequence (each
  block sees itself and the blocks before it: the pattern its block size gives)."""
  if config.diffusion.objective != "block":
    return np.asarray(logits(config, params, ids))
  ids = np.asarray(ids)
  hidden = two_stream_hidden(
      ModelConfig.from_config(config),
      params,
      ids,
      ids,
      np.ones(ids.shape, bool),
      np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
      None,
      block_size=config.diffusion.block_size,
  )
  return np.asarray(head_logits(params, hidden, np.float32))


def transformers_logits(folder, ids) -> np.ndarray:
  """Logits of transformers' LlamaForCausalLM loaded from `folder` (CPU, float32, eager)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(folder), dtype=torch.float32, attn_implementation="eager"
  )
  model.eval()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _llama_workdir(tmp_path, mask_id=None, name="work", tied=False) -> str:
  """A workdir converted from the tiny Llama (with its BPE tokenizer and Llama 3 chat tokens)."""
  folder = write_llama(tmp_path / "llama", llama_config_json(tied), llama_tensors(tied))
  write_tokenizer(folder)
  workdir = str(tmp_path / name)
  from_hf(str(folder), workdir, "float32", mask_id=mask_id)
  return workdir


@pytest.mark.parametrize("source", ["native", "llama", "llama_mask_id", "llama_tied"])
def test_an_arm_exports_as_a_llama_folder_that_transformers_loads(tmp_path, source):
  """native: an ARM trained here (byte vocabulary, mask row 259 after the 259 bytes); llama: the
  tiny Llama imported (mask row appended), llama_mask_id: imported with --mask_id=0 (<unk>),
  llama_tied: a Llama with tied embeddings (it stays tied: no lm_head.weight is written)."""
  tied = source == "llama_tied"
  if source == "native":
    workdir = write_workdir(str(tmp_path / "work"), make_tiny_config(causal=True))
  else:
    workdir = _llama_workdir(tmp_path, mask_id=0 if source == "llama_mask_id" else None, tied=tied)
  config, params = load_model(workdir)
  out = tmp_path / "out"
  to_hf(workdir, str(out), "float32", "5GB")
  hf = json.loads((out / "config.json").read_text())
  appended = source != "llama_mask_id"  # the mask row is dropped: the folder is a plain Llama
  rows = config.model.vocab_size - appended
  assert hf["model_type"] == "llama" and hf["vocab_size"] == rows
  assert ("mask_token_id" in hf) == (not appended) and hf["tie_word_embeddings"] is tied
  ours = np.asarray(logits(config, params, IDS[None]))[..., :rows]
  np.testing.assert_allclose(transformers_logits(out, IDS[None]), ours, rtol=1e-4, atol=1e-4)
  if source != "native":  # the folder is the Llama it came from, tensor for tensor
    written = dict(safetensors_io.iter_tensors(out / "model.safetensors"))
    original = llama_tensors(tied)
    assert sorted(written) == sorted(original)
    assert all(written[n].tobytes() == t.tobytes() for n, t in original.items())
    np.testing.assert_allclose(
        ours[0], numpy_llama(original, llama_config_json(tied), IDS), rtol=1e-5, atol=1e-5
    )
    assert (out / "tokenizer.json").is_file()
  back, again = load_model(str(out))
  assert shaping(back) == shaping(config)
  np.testing.assert_array_equal(np.asarray(logits(back, again, IDS[None]))[..., :rows], ours)


@pytest.mark.parametrize("reader", ["from-hf", "checkpoint"])
@pytest.mark.parametrize(
    "objective,changes",
    [
        ("mdm", {"logit_alignment": "shifted"}),
        ("block", {"block_size": 4}),
        ("block", {"block_size": 8, "logit_alignment": "shifted"}),
        ("arm", {}),
    ],
)
def test_workdirs_round_trip_with_their_objective_and_logits(tmp_path, objective, changes, reader):
  config = make_tiny_config(causal=objective == "arm")
  config.diffusion.update(dict(objective=objective, **changes))
  workdir = write_workdir(str(tmp_path / "work"), config)
  config, params = load_model(workdir)
  out = tmp_path / "hf"
  to_hf(workdir, str(out), "float32", "5GB")
  if reader == "from-hf":
    from_hf(str(out), str(tmp_path / "back"), "float32")
    back, again = load_model(str(tmp_path / "back"))
  else:
    back, again = load_model(str(out))
  assert shaping(back) == shaping(config)
  rows = config.model.vocab_size - (objective == "arm")  # an ARM's mask row is not the Llama's
  ids = np.asarray([[5, 17, 42, 259, 259, 7, 99, 3, 1, 0, 33, 80, 120, 200, 258, 9]])
  if objective == "arm":  # a causal model never reads the mask token
    ids = np.where(ids == config.tokens.mask_id, 4, ids)
  np.testing.assert_array_equal(
      model_logits(back, again, ids)[..., :rows], model_logits(config, params, ids)[..., :rows]
  )
  cut = (lambda w: w[:rows]) if objective == "arm" else (lambda w: w)
  np.testing.assert_array_equal(
      cut(np.asarray(again["wte"]["embedding"])), cut(np.asarray(params["wte"]["embedding"]))
  )


def test_a_llada_folder_keeps_the_token_ids_and_tokenizer_of_an_hf_vocabulary(tmp_path):
  """An MDM on a Llama's vocabulary ("hf": BOS 1, EOS 2, end of turn <|eot_id|> = 5, the mask
  the appended row) exports as a LLaDA folder whose ids all come back (BOS and EoT were lost)."""
  from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=g-import-not-at-top

  config, params = load_model(_llama_workdir(tmp_path))
  config.model.causal, config.diffusion.objective = False, "mdm"
  config.diffusion.logit_alignment = "shifted"
  save_hf(config, params, tmp_path / "out", dtype="float32")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llada"
  back, _ = load_model(str(tmp_path / "out"))
  assert (back.tokens.bos_id, back.tokens.eot_id, back.tokens.mask_id) == (1, 5, VOCAB)
  assert shaping(back) == shaping(config)
  assert back.data.tokenizer.endswith("tokenizer.json")


def test_the_export_writes_the_resolved_logit_alignment(tmp_path):
  """ "auto" is shifted for a run started from an AR model (train.init_from), same otherwise; the
  folder records the alignment the model was trained with, and a LLaDA folder that records none
  is LLaDA's ("same")."""
  from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=g-import-not-at-top

  config, params = load_model(write_workdir(str(tmp_path / "work"), make_tiny_config()))
  assert config.diffusion.logit_alignment == "auto"
  config.train.init_from = str(tmp_path / "some_llama")
  save_hf(config, params, tmp_path / "out", dtype="float32")
  hf = json.loads((tmp_path / "out" / "config.json").read_text())
  assert hf["llada_jax_logit_alignment"] == "shifted" and hf["llada_jax_objective"] == "mdm"
  back, _ = load_model(str(tmp_path / "out"))
  assert (back.diffusion.logit_alignment, back.train.init_from) == ("shifted", "")
  del hf["llada_jax_logit_alignment"]
  (tmp_path / "out" / "config.json").write_text(json.dumps(hf))
  assert load_model(str(tmp_path / "out"))[0].diffusion.logit_alignment == "same"


def test_a_second_export_into_the_same_folder_replaces_the_first(tmp_path):
  """A sharded export, then a single-file one of another model into the same folder: the stale
  index and shards of the first would be read instead of the new model.safetensors."""
  from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=g-import-not-at-top

  first = load_model(write_workdir(str(tmp_path / "a"), make_tiny_config()))
  second_config = make_tiny_config()
  second_config.seed = 1
  second = load_model(write_workdir(str(tmp_path / "b"), second_config))
  save_hf(*first, tmp_path / "out", max_shard_size="20KB", dtype="float32")
  assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
  save_hf(*second, tmp_path / "out", dtype="float32")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "config.json",
      "model.safetensors",
  ]
  _, params = load_model(str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(second[1]))


def _one_line(error, function, *args, **kwargs) -> str:
  with pytest.raises(error) as info:
    function(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def test_what_cannot_be_read_or_written_faithfully_is_refused_in_one_line(tmp_path):
  workdir = write_workdir(str(tmp_path / "work"), make_tiny_config())
  # A config.json in the workdir would hide its checkpoints from every command.
  assert "--out=" in _one_line(ConfigError, to_hf, workdir, workdir, "float32", "5GB")
  out = tmp_path / "hf"
  to_hf(workdir, str(out), "float32", "5GB")
  hf = json.loads((out / "config.json").read_text())
  for field, value, allowed in (
      ("llada_jax_objective", "bert", "one of mdm, arm, block"),
      ("llada_jax_block_size", 0, "a positive block size"),
      ("llada_jax_logit_alignment", "left", "one of auto, same, shifted"),
      ("llada_jax_vocabulary", "gpt2", "one of byte, spm8k, llada_hf, hf"),
  ):
    changed = dict(hf, llada_jax_objective="block")
    changed[field] = value
    (out / "config.json").write_text(json.dumps(changed))
    message = _one_line(CheckpointError, load_model, str(out))
    assert f"config.json {field}={value!r} is not allowed: expected {allowed}" in message
    assert str(out) in message
  # A Llama folder records a mask token inside its vocabulary; another --mask_id is refused.
  llama = _llama_workdir(tmp_path, mask_id=0, name="llama_work")
  to_hf(llama, str(tmp_path / "llama_out"), "float32", "5GB")
  message = _one_line(
      ConfigError, from_hf, str(tmp_path / "llama_out"), str(tmp_path / "w2"), "float32", mask_id=3
  )
  assert "mask_id=3 is not allowed" in message and "mask_token_id=0" in message
  hf = json.loads((tmp_path / "llama_out" / "config.json").read_text())
  (tmp_path / "llama_out" / "config.json").write_text(json.dumps(dict(hf, mask_token_id=VOCAB)))
  message = _one_line(CheckpointError, load_model, str(tmp_path / "llama_out"))
  assert f"mask_token_id={VOCAB} is not allowed" in message


def test_an_export_into_a_folder_of_other_files_is_refused_and_an_earlier_one_replaced(tmp_path):
  """A folder holding another model's files (a generation_config.json, a tokenizer) is refused
  before anything is written or read: they would be read back with the export. An earlier
  export's tokenizer.json, which a byte model does not write, is removed."""
  workdir = write_workdir(str(tmp_path / "work"), make_tiny_config())
  other = tmp_path / "other"
  other.mkdir()
  (other / "generation_config.json").write_text("{}")
  (other / "tokenizer.json").write_text("{}")
  message = _one_line(ConfigError, to_hf, workdir, str(other), "float32", "5GB")
  assert message.startswith(f"--out={other} is not allowed: it holds files that are not an")
  assert "generation_config.json" in message
  assert sorted(p.name for p in other.iterdir()) == ["generation_config.json", "tokenizer.json"]
  out = tmp_path / "out"
  to_hf(workdir, str(out), "float32", "5GB")
  (out / "tokenizer.json").write_text("{}")  # as an earlier export of a tokenizer model left it
  to_hf(workdir, str(out), "float32", "5GB")
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
