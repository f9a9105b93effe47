"""The operator console: server-rendered pages at ``/console``, live through the realtime stream."""
