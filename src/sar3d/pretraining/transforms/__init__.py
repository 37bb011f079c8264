"""Input corruptions of the pre-training pretext tasks (the Models Genesis family)."""
