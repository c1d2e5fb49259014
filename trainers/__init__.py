"""The LeNet trainer behind ``auditor-train`` (SPEC §7).

It trains the LeNet-300-100 and LeNet-5 studies of Schaub & Hotaling with the paper's recipe,
exports each network to ONNX (checked against PyTorch in onnxruntime before it is kept), and turns
any folder of exported networks into the paper's Tables 1–3, heatmaps and a test of whether the
metrics predict generalization, by auditing every network in process.

Read it in this order:

- ``records``: what a network is (``Architecture``, ``Recipe``, ``Job``) and what training gave
  (``TrainedNetwork``), with their manifest and ONNX-metadata forms;
- training one network: ``training_data`` and ``label_noise`` → ``lenet`` → ``train`` →
  ``export``, tied together by ``job``;
- many networks: ``grid`` (plans and runs, locally or on Ray), ``manifest`` and ``files``;
- the study: ``study`` (find and audit networks) → ``tables`` (cells, Tables 1–3, τ) with
  ``stats`` → ``figures`` and ``study_page`` (PNG and HTML);
- ``cli``: the ``auditor-train`` command.

PyTorch is imported only by the training modules (the ``train`` extra); ``auditor`` never
imports it, and the study needs only matplotlib. Errors are ``auditor.errors.AuditError``: one
line, and the CLI exits with code 2.
"""
