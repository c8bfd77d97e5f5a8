"""Tokenizers: `tokenizer` (Tokenizer, ByteTokenizer), `template` (sandboxed chat templates),
`stream` (streaming decode) and `sentencepiece` (SentencePiece BPE from GGUF metadata)."""
