"""The fastai layer: everything that imports fastai (the callback, post-hoc calibration of a Learner, distributed
training, the readers of a Learner's predictions and splits). The math below it (`fastai_ls.loss`,
`fastai_ls.calibration`) never imports fastai."""
