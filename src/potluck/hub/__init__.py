"""potluck hub: a read-only web view of potluck repositories (issue 18)."""
