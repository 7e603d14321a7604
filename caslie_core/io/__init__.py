"""Files in and out: `sources` reads MMECInstruct records (format detection, streaming readers, folder
discovery); `store` is the enrichment output (schema, atomic parts, listing, reading back, dedupe)."""
