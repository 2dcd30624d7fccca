"""The job's phases, in data-flow order: teacher → QAT teacher → PTL → export → verify → report."""
