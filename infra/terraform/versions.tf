terraform {
  required_version = ">= 1.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }

  # State: keep it remote for a team (S3 backend with locking), e.g.
  #   terraform init -backend-config=backend.hcl
  # with an `s3` backend block added here; local state is fine to try things out.
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ "app.kubernetes.io/part-of" = "geco" }, var.tags)
  }
}
