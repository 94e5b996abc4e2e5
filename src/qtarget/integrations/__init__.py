"""qtarget objectives inside other trainers.

    qtarget.integrations.verl            VerlLoss: a loss for verl's engine SFT trainer (set_loss_fn)
    qtarget.integrations.verl_sft        `python -m qtarget.integrations.verl_sft ... +qtarget.objective=dft`
    qtarget.integrations.llamafactory    `python -m qtarget.integrations.llamafactory config.yaml --objective dft`
    qtarget.integrations.label_logprob   objectives from log p(y) alone (what verl's loss contract passes)

Each integration module imports its framework itself; this package imports none of them.
"""
