"""The composition root: the ``needle`` command line, the process wiring (one stack of services per process,
child processes and their supervisor) and the embedded nats-server and Postgres. It sits above every service;
``shared/`` never imports it."""
