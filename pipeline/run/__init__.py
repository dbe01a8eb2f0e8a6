"""Running the flow: the runner (sequential or Ray Data), stage workers, pools sized by measured cost, Ray Data hooks,
progress, and Ray Jobs submission."""
