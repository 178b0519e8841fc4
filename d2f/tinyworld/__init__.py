"""The miniature world: a synthetic GSM8K-format task, its tokenizer, a pretrained tiny teacher and
AR baseline shipped with the package, and the quickstart that runs D2F's whole story on a CPU."""
