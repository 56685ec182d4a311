from setuptools import find_packages, setup

setup(
    name="rosa_ds",
    version="0.1.0",
    description="ROSA (Random Subspace Adaptation) fine-tuning on DeepSpeed ZeRO",
    packages=find_packages(include=["rosa_ds", "rosa_ds.*"]),
    # the DeepSpeed JSON templates ship with the package (ds_configs/ in the repository links to them)
    package_data={"rosa_ds.ds": ["templates/*.json"]},
    python_requires=">=3.10",
    # Exact pins live in requirements.txt (installed by `make`); these are the floors.
    install_requires=["torch>=2.4", "deepspeed>=0.19", "transformers>=5.0", "datasets>=4.0", "safetensors",
                      "scipy>=1.10", "threadpoolctl>=3.1"],
    entry_points={"console_scripts": ["rosa-ds-launch=rosa_ds.launch:main"]},
    extras_require={"bnb": ["bitsandbytes"], "lora": ["peft"], "gguf": ["gguf"]},
)
