"""Generation: ``gptfast.generate`` (generation.generate) and the parts it drives.

This ``__init__`` imports nothing: ``generation.decode_state`` (the sampler's data) sits
below the reference twins that read it, and importing it must not pull in the rest of
generation. The public names are ``gptfast.generate`` and ``gptfast.SamplingParams``.
"""
