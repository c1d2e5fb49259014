"""The trainer behind ``auditor-train`` (SPEC §7).

It trains the LeNet-300-100 and LeNet-5 studies of Schaub & Hotaling with the paper's recipe, and
the CNA paper's 5×500 MLP with its recipe, exports each network (and its checkpoints) to ONNX
(checked against PyTorch in onnxruntime before it is kept), and turns any folder of exported
networks into the paper's Tables 1–3, heatmaps and the CNA paper's test of whether CNA and
CNA-Margin predict generalization better than norm baselines, by auditing every network in
process.

Read it in this order:

- ``records``: what a network is (``Architecture``, ``Recipe``, ``TrainingJob``) and what training gave
  (``TrainedNetwork``), with their manifest and ONNX-metadata forms;
- training one network: ``training_data`` (with ``noise_data``, the Gaussian-noise set) and
  ``label_noise`` → ``lenet`` → ``train`` → ``export``, tied together by ``job``;
- many networks: ``batched`` (one grouped-matmul model for many members), ``grid`` (plans and
  runs groups, locally or on Ray), ``manifest`` and ``files``;
- the study: ``study`` (find and audit networks) → ``tables`` (cells, Tables 1–3, τ) with
  ``stats``, and ``generalization`` (the CNA study: r and τ with bootstrap intervals) →
  ``figures`` and ``study_page`` (PNG and HTML);
- ``cli``: the ``auditor-train`` command.

PyTorch is imported only by the training modules (the ``train`` extra); ``auditor`` never
imports it, and the study needs only matplotlib. Errors are ``auditor.errors.AuditError``: one
line, and the CLI exits with code 2.
"""
