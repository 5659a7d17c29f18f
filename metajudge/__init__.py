"""The method layer: Meta-Rewarding and (Temporal) Self-Rewarding on top of ``models``.

Each rule of METHODS.md as a pure function (``judge``, ``pairs``, ``temporal``, ``meta_judge``,
``pair_assembly``, ``evaluate``), the roles that run the rules' prompts on a model (``roles``), and
the training of models (``train``, ``trainer``) with its data, checkpoints, stages and reports.
"""
