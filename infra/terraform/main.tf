# The bucket of one geco deployment. Prefixes (what reads and writes them: iam.tf):
#   shards/   WebDataset shards and manifest.json (`geco data shard --out s3://BUCKET/shards/NAME`)
#   weights/  backbone weights (geco.backbone.weights = s3://BUCKET/weights/resnet18-f37072fd.pth)
#   ray/      Ray Train/Tune storage: checkpoints, results (cluster.storage_path = s3://BUCKET/ray)
#   mlflow/   MLflow artifacts, written only by the tracking server (--artifacts-destination)

locals {
  prefixes = {
    shards  = "shards"
    weights = "weights"
    ray     = "ray"
    mlflow  = "mlflow"
  }
}

resource "aws_s3_bucket" "geco" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_ownership_controls" "geco" {
  bucket = aws_s3_bucket.geco.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "geco" {
  bucket = aws_s3_bucket.geco.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "geco" {
  bucket = aws_s3_bucket.geco.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "geco" {
  bucket = aws_s3_bucket.geco.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "geco" {
  bucket = aws_s3_bucket.geco.id

  # Versioning must be on before noncurrent-version rules apply.
  depends_on = [aws_s3_bucket_versioning.geco]

  # Old checkpoints: a run's checkpoints and results expire after checkpoint_expiration_days;
  # the versions Ray replaces or deletes (num_to_keep) go after a short grace period.
  rule {
    id     = "ray-checkpoints"
    status = "Enabled"

    filter {
      prefix = "${local.prefixes.ray}/"
    }

    expiration {
      days = var.checkpoint_expiration_days
    }

    noncurrent_version_expiration {
      noncurrent_days = var.checkpoint_noncurrent_expiration_days
    }
  }

  # Everything else is kept; only replaced or deleted versions expire.
  rule {
    id     = "noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 3
    }
  }
}

# TLS only: deny any request to the bucket that does not use HTTPS.
data "aws_iam_policy_document" "bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.geco.arn,
      "${aws_s3_bucket.geco.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "geco" {
  bucket = aws_s3_bucket.geco.id
  policy = data.aws_iam_policy_document.bucket.json

  depends_on = [aws_s3_bucket_public_access_block.geco]
}
