"""Every sampler option against an independent NumPy transcription of the official `generate`.

The reference follows the structure of LLaDA's PyTorch code (per-block schedule, per-step top-k,
Python loops); only its random numbers are drawn from the same jax keys as the compiled sampler
(row r, step s: fold_in(fold_in(rng, r), s), split into noise and remasking keys, each folded with
the position), so outputs can be compared token for token.
"""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cli_env, make_tiny_config
from llada_jax.model import ModelConfig, Transformer, logits
from llada_jax.sampling import generate

EOS, EOT = 1, 5


@pytest.fixture(scope="module")
def setup():
  config = make_tiny_config()
  config.tokens.eot_id = EOT
  params = Transformer(ModelConfig.from_config(config)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
  )
  return config, nn.meta.unbox(params)["params"]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _draws(rng, step, shape, which):
  """Gumbel noise (which=0) [B, L, V] or uniforms (which=1) [B, L] of one step, from
  fold_in(split(fold_in(fold_in(rng, row), step))[which], position)."""
  out = np.zeros(shape, np.float64)
  for row in range(shape[0]):
    key = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, row), step))[which]
    for position in range(shape[1]):
      k = jax.random.fold_in(key, position)
      out[row, position] = (
          jax.random.gumbel(k, shape[2:]) if which == 0 else jax.random.uniform(k, ())
      )
  return out


def reference_generate(
    config,
    params,
    prompt,
    *,
    steps,
    gen_length,
    block_length,
    temperature,
    cfg_scale,
    remasking,
    logits_eos_inf,
    confidence_eos_eot_inf,
    rng,
):
  mask_id = config.tokens.mask_id
  batch, plen = prompt.shape
  x = np.full((batch, plen + gen_length), mask_id, np.int64)
  x[:, :plen] = prompt
  prompt_index = x != mask_id
  num_blocks = gen_length // block_length
  steps_per_block = steps // num_blocks
  for b in range(num_blocks):
    block = x[:, plen + b * block_length : plen + (b + 1) * block_length] == mask_id
    counts = block.sum(1)
    schedule = np.zeros((batch, steps_per_block), np.int64) + (counts // steps_per_block)[:, None]
    for j in range(batch):
      schedule[j, : counts[j] % steps_per_block] += 1
    for i in range(steps_per_block):
      step = b * steps_per_block + i
      mask_index = x == mask_id
      if cfg_scale > 0:
        un_x = x.copy()
        un_x[prompt_index] = mask_id
        both = np.asarray(logits(config, params, np.concatenate([x, un_x])), np.float64)
        cond, uncond = both[:batch], both[batch:]
        z = uncond + (cfg_scale + 1) * (cond - uncond)
      else:
        z = np.asarray(logits(config, params, x), np.float64)
      if logits_eos_inf:
        z[:, :, EOS] = -np.inf
      noisy = z + temperature * _draws(rng, step, z.shape, 0) if temperature > 0 else z
      x0 = noisy.argmax(-1)
      p = _softmax(z)
      if remasking == "low_confidence":
        conf = np.take_along_axis(p, x0[..., None], -1)[..., 0]
      elif remasking == "random":
        conf = _draws(rng, step, x0.shape, 1)
      elif remasking == "margin":
        top = np.sort(p, -1)
        conf = top[..., -1] - top[..., -2]
      else:
        conf = (p * np.log(p + 1e-10)).sum(-1)
      if confidence_eos_eot_inf:
        conf[(x0 == EOS) | (x0 == EOT)] = -1e30
      conf[:, plen + (b + 1) * block_length :] = -np.inf
      x0 = np.where(mask_index, x0, x)
      conf = np.where(mask_index, conf, -np.inf)
      for j in range(batch):
        chosen = np.argsort(-conf[j], kind="stable")[: schedule[j, i]]
        x[j, chosen] = x0[j, chosen]
  return x


OPTIONS = [
    dict(remasking="low_confidence"),
    dict(remasking="random"),
    dict(remasking="margin"),
    dict(remasking="entropy"),
    dict(remasking="low_confidence", temperature=0.8),
    dict(remasking="low_confidence", cfg_scale=1.5),
    dict(remasking="low_confidence", logits_eos_inf=True),
    dict(remasking="low_confidence", confidence_eos_eot_inf=True),
    dict(remasking="random", temperature=1.0, cfg_scale=0.5, block_length=4),
    dict(remasking="low_confidence", steps=4, block_length=16),
    dict(remasking="low_confidence", steps=12, gen_length=12, block_length=3),
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_matches_reference(setup, options):
  config, params = setup
  kwargs = dict(
      steps=16,
      gen_length=16,
      block_length=8,
      temperature=0.0,
      cfg_scale=0.0,
      logits_eos_inf=False,
      confidence_eos_eot_inf=False,
      rng=jax.random.PRNGKey(5),
  )
  kwargs.update(options)
  prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 6), 3, 259))
  got = np.asarray(generate(config, params, prompt, **kwargs))
  np.testing.assert_array_equal(got, reference_generate(config, params, prompt, **kwargs))


def test_one_token_per_step_with_steps_equal_gen_length(setup):
  config, params = setup
  prompt = np.asarray([[10, 11, 12]])
  out, trajectory = generate(
      config, params, prompt, steps=16, gen_length=16, block_length=16, return_trajectory=True
  )
  remaining = (np.asarray(trajectory) == config.tokens.mask_id).sum(axis=(1, 2))
  np.testing.assert_array_equal(remaining, np.arange(15, -1, -1))
  np.testing.assert_array_equal(np.asarray(trajectory)[-1], np.asarray(out))


def test_committed_tokens_never_change(setup):
  config, params = setup
  _, trajectory = generate(
      config,
      params,
      np.asarray([[10, 11, 12]]),
      steps=8,
      gen_length=16,
      block_length=8,
      temperature=1.0,
      return_trajectory=True,
  )
  trajectory = np.asarray(trajectory)
  committed = trajectory[:-1] != config.tokens.mask_id
  assert np.all(trajectory[1:][committed] == trajectory[:-1][committed])


def test_cfg_scale_zero_equals_no_guidance(setup):
  config, params = setup
  prompt = np.asarray([[10, 11, 12, 13]])
  kwargs = dict(steps=8, gen_length=16, block_length=8)
  np.testing.assert_array_equal(
      generate(config, params, prompt, cfg_scale=0.0, **kwargs),
      generate(config, params, prompt, cfg_scale=1e-9, **kwargs),
  )


def test_left_padded_batch_equals_each_prompt_alone(setup):
  config, params = setup
  short, long = [20, 21], [30, 31, 32, 33, 34]
  batch = np.asarray([[config.tokens.pad_id] * 3 + short, long])
  mask = np.asarray([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
  kwargs = dict(steps=8, gen_length=16, block_length=8, remasking="low_confidence")
  together = np.asarray(generate(config, params, batch, mask, **kwargs))
  alone_short = np.asarray(generate(config, params, np.asarray([short]), **kwargs))
  alone_long = np.asarray(generate(config, params, np.asarray([long]), **kwargs))
  np.testing.assert_array_equal(together[0, 5:], alone_short[0, 2:])
  np.testing.assert_array_equal(together[1], alone_long[0])


def test_masks_in_the_prompt_are_infilled(setup):
  config, params = setup
  mask_id = config.tokens.mask_id
  prompt = np.asarray([[10, mask_id, 12, mask_id, mask_id, 15]])
  out = np.asarray(generate(config, params, prompt, steps=8, gen_length=8, block_length=8))
  assert not (out == mask_id).any()
  np.testing.assert_array_equal(out[0, [0, 2, 5]], [10, 12, 15])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(steps=8, gen_length=16, block_length=5), "block_length=5"),
        (dict(steps=3, gen_length=16, block_length=8), "steps=3"),
        (dict(steps=32, gen_length=16, block_length=16), "steps=32"),
        (dict(steps=8, gen_length=64, block_length=8), "max_sequence_length"),
        (dict(steps=8, gen_length=8, block_length=8, remasking="top_p"), "remasking='top_p'"),
        (dict(steps=8, gen_length=8, block_length=8, temperature=-1.0), "temperature=-1.0"),
        (dict(steps=8, gen_length=8, block_length=8, cfg_scale=-0.5), "cfg_scale=-0.5"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(setup, kwargs, needle):
  config, params = setup
  with pytest.raises(ValueError, match=needle) as err:
    generate(config, params, np.asarray([[10, 11, 12]]), **kwargs)
  assert "\n" not in str(err.value)


def test_out_of_vocabulary_prompt_and_pad_equal_mask_are_rejected(setup):
  config, params = setup
  with pytest.raises(ValueError, match="prompt token id 999"):
    generate(config, params, np.asarray([[10, 999]]), steps=8, gen_length=8, block_length=8)
  bad = make_tiny_config()
  bad.tokens.pad_id = bad.tokens.mask_id
  with pytest.raises(ValueError, match="tokens.pad_id"):
    generate(bad, params, np.asarray([[10]]), steps=8, gen_length=8, block_length=8)


def test_float64_is_refused_without_x64_and_draws_the_official_float64_numbers_with_it(setup):
  """Without jax_enable_x64 float64=True is a one-line error. With it (one subprocess) the reference
  draws its Gumbel noise and remasking uniforms in float64, as the official PyTorch code does;
  float64=True gives its tokens exactly, float32 draws (other random bits, other values) do not:
  the option reaches the compiled draws. Greedy decoding is the same in either precision."""
  config, params = setup
  with pytest.raises(ValueError, match="jax_enable_x64"):
    generate(
        config, params, np.asarray([[10]]), steps=8, gen_length=8, block_length=8, float64=True
    )
  script = (
      "import json, jax, numpy as np\n"
      "jax.config.update('jax_enable_x64', True)\n"
      "import flax.linen as nn, jax.numpy as jnp\n"
      "from test_sampler_reference import EOT, _draws, reference_generate\n"
      "from conftest import make_tiny_config\n"
      "from llada_jax.model import ModelConfig, Transformer\n"
      "from llada_jax.sampling import generate\n"
      "c = make_tiny_config()\n"
      "c.tokens.eot_id = EOT\n"
      "p = nn.meta.unbox(Transformer(ModelConfig.from_config(c)).init(jax.random.PRNGKey(0),"
      " jnp.zeros((1, 8), jnp.int32)))['params']\n"
      "assert jax.random.gumbel(jax.random.PRNGKey(0), (2,)).dtype == np.float64\n"
      "kw = dict(steps=4, gen_length=8, block_length=8, temperature=1.0, cfg_scale=0.0,"
      " remasking='random', logits_eos_inf=False, confidence_eos_eot_inf=False,"
      " rng=jax.random.PRNGKey(5))\n"
      "prompt = np.asarray([[10, 11, 12]], np.int32)\n"
      "want = reference_generate(c, p, prompt, **kw)\n"
      "got = {f: np.asarray(generate(c, p, prompt, float64=f, **kw)).tolist() for f in (1, 0)}\n"
      "g = dict(steps=8, gen_length=8, block_length=8)\n"
      "a = generate(c, p, np.asarray([[10, 11]]), float64=True, temperature=1.0, **g)\n"
      "assert a.dtype == np.int32 and a.shape == (1, 10)\n"
      "greedy = [np.asarray(generate(c, p, np.asarray([[10, 11]]), float64=f, **g)).tolist()"
      " for f in (True, False)]\n"
      "print(json.dumps(dict(want=want.tolist(), f64=got[1], f32=got[0], greedy=greedy)))\n"
  )
  env = cli_env()
  result = subprocess.run(
      [sys.executable, "-c", script],
      cwd=pathlib.Path(__file__).parent,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  import json  # pylint: disable=g-import-not-at-top

  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["f64"] == out["want"]
  assert out["f32"] != out["want"]
  assert out["greedy"][0] == out["greedy"][1]
