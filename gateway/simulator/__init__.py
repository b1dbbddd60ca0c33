"""The virtual Pico: run unchanged MicroPython firmware on a Linux host.

* ``gateway.simulator.pico``      -- runner: one firmware, one process
* ``gateway.simulator.fleet``     -- start_fleet(): one virtual Pico per device
* ``gateway.simulator.config_py`` -- render_config_py(): the firmware's config.py
* ``gateway.simulator.i2c_bus``   -- SimulatedSMBus + the I2C socket wire format
* ``gateway.simulator.mpy``       -- shim modules (machine, network, umqtt, ...)
* ``gateway.simulator.patches``   -- patches of time, gc, socket, sys
* ``gateway.simulator.console``   -- USB console (pty) ; ``repl`` -- its REPL
* ``gateway.simulator.runtime``   -- knobs, LED, state file (pico.json)
"""
