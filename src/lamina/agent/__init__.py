"""The machine agent: reports boot, applies identity, and makes what is mounted on the
machine what the manager wants (layers at login, live attach/detach, writable layers)."""
