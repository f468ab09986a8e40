"""The serving topology: launch, HTTP front end, tokenizer manager, detokenizer (and, as it
grows, the data-parallel coordinator and KV-cache events). Nothing here loads torch except the
scheduler processes it starts."""
