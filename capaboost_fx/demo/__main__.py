"""``python -m capaboost_fx.demo``: see `capaboost_fx.demo.run.main`."""

from capaboost_fx.demo.run import main

raise SystemExit(main())
