"""cadence's training strategies in Keras' own ``fit``, on any Keras backend.

    import keras, cadence.keras as ck

    lr = ck.schedule("wsd", peak_lr=1e-3, total_steps=epochs * steps, warmup=0.05,
                     cooldown="1-sqrt")
    model.compile(keras.optimizers.AdamW(lr, weight_decay=0.05), "mse")
    model.fit(x, y, epochs=epochs, callbacks=[
        ck.HyperparamCallback(weight_decay="lr"),
        ck.PlateauCallback("val_loss", patience=2),
    ], validation_data=(xv, yv))

or from a cadence config or recipe (``cadence.load_config``): :func:`schedule_from_config` and
:func:`callbacks_from_config`. Every value is computed by cadence's own pure functions
(``cadence.schedules``), so a Keras run follows the schedule ``cadence train`` would. A model
saved with ``model.save("m.keras")`` reloads with its schedule once this module is imported.

This package imports Keras (whichever backend ``KERAS_BACKEND`` names); nothing else in
cadence imports it, so cadence's own runs never load Keras or TensorFlow.
"""

from cadence.keras.callbacks import HyperparamCallback, PlateauCallback, callbacks_from_config
from cadence.keras.lr import CadenceSchedule, schedule, schedule_from_config

__all__ = [
    "CadenceSchedule",
    "HyperparamCallback",
    "PlateauCallback",
    "callbacks_from_config",
    "schedule",
    "schedule_from_config",
]
