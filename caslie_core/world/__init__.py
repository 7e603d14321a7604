"""A small world where the truth is known: catalog v2, whose labels live in the pictures (`catalog`), and a
captioner and judge trained offline on it (`models`), so that the method's effect shows through the real jobs."""
