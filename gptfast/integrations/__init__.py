"""gptfast inside other libraries' models (layer 5: uses of the ops). ``gptfast.integrations.hf``
serves Hugging Face transformers models; it imports transformers, so import it explicitly."""
