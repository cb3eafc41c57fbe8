"""`dcgan sweep`: hyperparameter sweeps on FID with Ray Tune, each trial a whole job.

- space: the space file, checked like a config.
- trial: the Tune trainable that drives one trial's job and reports its scores.
- schedulers: ASHA and PBT reading a score with its noise and provenance card.
- results: the table, sweep.json and sweep.md.
- run: the Tuner, its storage, concurrency and `--resume`.

Ray is imported only when a sweep runs (`import pipeline.cli` loads none of it).
"""
