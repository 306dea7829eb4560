"""Modality decoders: backbone states -> text tokens, image codes, audio frames, embeddings."""
