"""The vocabulary every other part shares: records, the stage contract, typed configs, the output format's names,
the one video decoder, boxes. Imports nothing else of the project."""
