"""Checkpoints, in one package: a run's whole "where am I", written, found, mirrored and loaded.

manager.py    Checkpointer, what the training loop calls: when to save, what a checkpoint of
              the run holds, where a run continues from (resume, mirror pull, checks)
folder.py     the folder format `<run_dir>/checkpoints/step_NNNNNNN/` and its one owner:
              save (atomic), list, rotate, verify, load; load_model for the other stages
tensors.py    the model's and optimizers' tensors through torch.distributed.checkpoint (DCP),
              each process its own part, resharded on load
safe_load.py  reading torch.save files weights-only; the refusal of one that would run code
mirror.py     copies off the machine (checkpoint.mirror=URL, fsspec) and pulling them back
"""
