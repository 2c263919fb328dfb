"""What the tests share, so that no test module imports another (conftest.py keeps the fixtures and hooks):

- parametrize: the axes tests run over (ISAS, FLOAT_DTYPES) and readable ids (id_formatter);
- tensors: random inputs and bit-exact comparison;
- checkpoints: small models and the files they are saved as (safetensors, Hugging Face directories, raw headers);
- methods: the table of merge methods and a family of fine-tunes to merge with them;
- faults: malformed safetensors headers and a disk that fills up;
- cli: the repository's root and `python -m pysoup` in a fresh process.
"""
